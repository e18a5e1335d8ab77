"""View layouts (how diffusers pipelines arrange views) and pair selection."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch

PairSpec = Union[str, Sequence[Sequence[int]], None]

PAIR_MODES = ("adjacent", "all", "reference")
LAYOUT_KINDS = ("batch", "frames", "grid")


def resolve_pairs(pairs: PairSpec, num_views: int) -> list[tuple[int, int]]:
    """Turn a pair specification into an explicit list of (i, j) view-index pairs.

    `None` means the single pair (0, 1) for two views and "adjacent" for more.
    "adjacent": (0,1), (1,2), ...; "all": every i < j; "reference": (0, j) for j >= 1; a single
    (i, j) or a list of them is taken as given.
    """
    if num_views < 2:
        raise ValueError(f"num_views must be at least 2 to form a pair, got {num_views}")
    if pairs is None:
        pairs = "adjacent"
    if isinstance(pairs, str):
        if pairs == "adjacent":
            return [(i, i + 1) for i in range(num_views - 1)]
        if pairs == "all":
            return [(i, j) for i in range(num_views) for j in range(i + 1, num_views)]
        if pairs == "reference":
            return [(0, j) for j in range(1, num_views)]
        raise ValueError(f"pairs must be one of {PAIR_MODES} or a list of (i, j), got {pairs!r}")
    if len(pairs) == 2 and all(isinstance(v, int) for v in pairs):  # a single (i, j)
        pairs = [pairs]
    result = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"pairs entries must be (i, j) tuples, got {pair!r}")
        i, j = int(pair[0]), int(pair[1])
        if not (0 <= i < num_views and 0 <= j < num_views):
            raise ValueError(f"pair {(i, j)} is out of range for {num_views} views")
        if i == j:
            raise ValueError(f"pair {(i, j)} compares a view with itself")
        result.append((i, j))
    if not result:
        raise ValueError("pairs is an empty list")
    return result


@dataclass(frozen=True)
class ViewLayout:
    """Where the views of one sample live in a pipeline's latents (and decoded images).

    * `"batch"`: `V` consecutive batch entries are the views of one sample (`num_images_per_prompt=V`,
      MVDream / MV-Adapter style); latents `(B*V, C, h, w)`. `num_views=None` means the whole batch is one sample.
    * `"frames"`: video latents, frames are views; `(B, F, C, h, w)` (SVD, CogVideoX; `frame_dim=1`) or
      `(B, C, F, h, w)` (AnimateDiff, Wan; `frame_dim=2`). `frame_dim=None` picks the axis that is not the
      latent channel axis when `latent_channels` is passed, else 1. `num_views < F` scores `num_views` evenly
      spaced frames (only those are decoded).
    * `"grid"`: `rows x cols` views tiled row-major in one image (Zero123++'s 3x2 grid); latents `(B, C, h, w)`
      are decoded whole and the decoded image is cut into tiles. `num_views < rows*cols` keeps the first ones.

    `batch` and `grid` pass latents of any shape through `to_decode` (packed Flux-style latents included, for a
    custom decoder); `frames` needs 5-D latents.

    Strings are accepted where a layout is expected: `"batch"`, `"frames"`, `"frames:bfchw"`, `"frames:bcfhw"`,
    `"grid:RxC"` (e.g. `"grid:3x2"`).
    """

    kind: str = "batch"
    num_views: int | None = None
    frame_dim: int | None = None
    grid: tuple[int, int] | None = None

    def __post_init__(self):
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"layout must be one of {LAYOUT_KINDS}, got {self.kind!r}")
        if self.num_views is not None and self.num_views < 2:
            raise ValueError(f"num_views must be at least 2, got {self.num_views}")
        if self.frame_dim not in (None, 1, 2):
            raise ValueError(f"frame_dim must be 1 (B,F,C,h,w) or 2 (B,C,F,h,w), got {self.frame_dim}")
        if self.kind == "grid":
            if self.grid is None or len(self.grid) != 2 or min(self.grid) < 1 or self.grid[0] * self.grid[1] < 2:
                raise ValueError(f"grid layout needs grid=(rows, cols) with at least 2 tiles, got {self.grid!r}")
            if self.num_views is not None and self.num_views > self.grid[0] * self.grid[1]:
                raise ValueError(f"num_views={self.num_views} exceeds the {self.grid[0]}x{self.grid[1]} grid")

    @classmethod
    def parse(cls, layout: str | ViewLayout, num_views: int | None = None) -> ViewLayout:
        """Build a layout from a string shortcut (or return a given layout, with `num_views` filled in)."""
        if isinstance(layout, ViewLayout):
            if num_views is None or layout.num_views == num_views:
                return layout
            return cls(layout.kind, num_views, layout.frame_dim, layout.grid)
        if not isinstance(layout, str):
            raise TypeError(f"layout must be a string or a ViewLayout, got {type(layout).__name__}")
        kind, _, option = layout.partition(":")
        if kind == "frames" and option:
            dims = {"bfchw": 1, "bcfhw": 2}
            if option not in dims:
                raise ValueError(f"layout {layout!r}: frames option must be one of {tuple(dims)}")
            return cls(kind, num_views, frame_dim=dims[option])
        if kind == "grid":
            rows, _, cols = option.partition("x")
            if not (rows.isdigit() and cols.isdigit()):
                raise ValueError(f"layout {layout!r}: grid layouts are written 'grid:RxC', e.g. 'grid:3x2'")
            return cls(kind, num_views, grid=(int(rows), int(cols)))
        if option:
            raise ValueError(f"layout {layout!r} takes no option")
        return cls(kind, num_views)

    def _frame_dim(self, latents: torch.Tensor, latent_channels: int | None) -> int:
        if self.frame_dim is not None:
            return self.frame_dim
        if latent_channels is not None:
            matches = [d for d in (1, 2) if latents.shape[d] != latent_channels]
            if len(matches) == 1:
                return matches[0]
        return 1

    def _frame_indices(self, num_frames: int) -> torch.Tensor:
        if self.num_views is None or self.num_views == num_frames:
            return torch.arange(num_frames)
        if self.num_views > num_frames:
            raise ValueError(f"num_views={self.num_views} exceeds the {num_frames} frames of the latents")
        return torch.linspace(0, num_frames - 1, self.num_views).round().long()

    def to_decode(self, latents: torch.Tensor, latent_channels: int | None = None) -> tuple[torch.Tensor, int]:
        """Latents to decode, (N, C, h, w), and the number of samples B (differentiable reshapes only)."""
        if self.kind == "frames":
            if latents.ndim != 5:
                raise ValueError(f"frames layout expects 5-D video latents, got shape {tuple(latents.shape)}")
            frame_dim = self._frame_dim(latents, latent_channels)
            if frame_dim == 2:
                latents = latents.transpose(1, 2)
            latents = latents[:, self._frame_indices(latents.shape[1]).to(latents.device)]
            return latents.flatten(0, 1), latents.shape[0]
        # batch / grid: (N, C, h, w), or packed (N, L, D) latents left to a custom decode_fn
        if self.kind == "grid":
            return latents, latents.shape[0]
        views = latents.shape[0] if self.num_views is None else self.num_views
        if latents.shape[0] % views:
            raise ValueError(f"batch of {latents.shape[0]} latents is not a multiple of num_views={views}")
        return latents, latents.shape[0] // views

    def to_views(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Decoded images (N, 3, H, W) from `to_decode`'s latents -> views (B, V, 3, H, W)."""
        if self.kind != "grid":
            return images.reshape(batch_size, -1, *images.shape[1:])
        rows, cols = self.grid
        n, c, height, width = images.shape
        if height % rows or width % cols:
            raise ValueError(f"decoded image {height}x{width} does not split into a {rows}x{cols} grid")
        tiles = images.reshape(n, c, rows, height // rows, cols, width // cols).permute(0, 2, 4, 1, 3, 5)
        tiles = tiles.reshape(n, rows * cols, c, height // rows, width // cols)
        return tiles if self.num_views is None else tiles[:, : self.num_views]
