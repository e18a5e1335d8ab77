"""MEt3R's network-free stages, as public functions: point maps + features -> per-pair scores.

For each (sample, pair) row, with both point maps in view i's camera frame (MEt3R, Sec. 3):

    canon = canonical_point_map(pts_i, pts_j, conf_i, conf_j)      # confidence-weighted mean point map
    focal = estimate_focal(canon)                                   # (1 + fx/W, 1 + fy/H), as the reference
    projections, mask = render_pair(points, features, ...)          # both clouds splatted into camera i
    score_map = distance(projections[0], projections[1])            # e.g. 1 - cos(F_i, F_j) per pixel
    scores, valid = pair_scores(score_map, mask, distance, empty=)  # masked mean; "nan" | "zero" when empty

`score_pairs` runs these stages for a set of rows; `sample_scores` and `fold_symmetric` aggregate pairs.
`MEt3R`, `MEt3RLoss` and the guidance objective all go through them: nothing else derives a score.

Camera set-up quirks reproduced from the reference (documented in docs/render.md): the focal votes use
integer pixel coordinates centred at (W/2, H/2), the median ignores NaN votes but keeps +-inf ones and takes
the lower middle value for an even count, and the result is normalised as ``1 + f/W``, ``1 + f/H`` rather than
PyTorch3D's pinhole ``2 f / min(H, W)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .distances import Distance
from .render import render_points

__all__ = [
    "EMPTY_MODES", "PairScores", "canonical_point_map", "estimate_focal", "fold_symmetric", "pair_rows",
    "pair_scores", "render_pair", "sample_scores", "score_pairs",
]

# How a pair without any overlapping pixel is scored: NaN (MEt3R's reporting: nothing could be compared) or
# 0 with a zero gradient (the NaN-free objective for losses and guidance); either way `valid` is False.
EMPTY_MODES = ("nan", "zero")

# DUSt3R / MASt3R confidences are >= 1; MEt3R weights each view by its confidence minus this.
_CONFIDENCE_OFFSET = 0.999


def canonical_point_map(
    pts3d: torch.Tensor, pts3d_other: torch.Tensor, conf: torch.Tensor, conf_other: torch.Tensor
) -> torch.Tensor:
    """Confidence-weighted mean of a pair's two point maps (weights `conf - 0.999`), (B, H, W, 3)."""
    if pts3d.dim() != 4 or pts3d.shape[-1] != 3:
        raise ValueError(f"pts3d must have shape (B, H, W, 3), got {tuple(pts3d.shape)}")
    if pts3d_other.shape != pts3d.shape:
        raise ValueError(
            f"pts3d_other must have the shape of pts3d {tuple(pts3d.shape)}, got {tuple(pts3d_other.shape)}"
        )
    for name, tensor in (("conf", conf), ("conf_other", conf_other)):
        if tensor.shape != pts3d.shape[:-1]:
            raise ValueError(
                f"{name} must have shape (B, H, W) = {tuple(pts3d.shape[:-1])}, got {tuple(tensor.shape)}"
            )
    weight = conf[..., None] - _CONFIDENCE_OFFSET
    weight_other = conf_other[..., None] - _CONFIDENCE_OFFSET
    return (weight * pts3d + weight_other * pts3d_other) / (weight + weight_other)


def estimate_focal(points: torch.Tensor) -> torch.Tensor:
    """MEt3R's normalised NDC focal (1 + fx/W, 1 + fy/H) of (B, H, W, 3) point maps, shape (B, 2)."""
    if points.dim() != 4 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (B, H, W, 3), got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise ValueError(f"points must be a floating-point tensor, got {points.dtype}")
    if points.shape[0] == 0:
        return points.new_empty(0, 2)
    votes = _focal_votes(points)
    focal_px = torch.nanmedian(votes, dim=1).values  # (B, 2), NaN votes ignored, +-inf kept
    height, width = points.shape[1:3]
    return torch.stack([1 + focal_px[:, 0] / width, 1 + focal_px[:, 1] / height], dim=-1)


def _focal_votes(points: torch.Tensor) -> torch.Tensor:
    """Per-pixel focal votes (u*z/x, v*z/y) in pixels, (B, H*W, 2) in row-major pixel order."""
    batch, height, width, _ = points.shape
    # Integer pixel positions relative to the image centre (no half-pixel shift, as in MEt3R).
    u = torch.arange(width, dtype=points.dtype, device=points.device) - width / 2
    v = torch.arange(height, dtype=points.dtype, device=points.device) - height / 2
    x, y, z = points.unbind(dim=-1)
    votes_x = (u * z) / x  # u broadcasts along W
    votes_y = (v[:, None] * z) / y  # v broadcasts along H
    return torch.stack([votes_x.reshape(batch, -1), votes_y.reshape(batch, -1)], dim=-1)


def pair_rows(batch: int, pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Sample index, view i and view j of every (sample, pair) row, rows in (b, pair) order: three (B*P,) tensors."""
    index = torch.tensor(pairs, device=device, dtype=torch.long)  # (P, 2)
    sample = torch.arange(batch, device=device).repeat_interleave(len(pairs))
    return sample, index[:, 0].repeat(batch), index[:, 1].repeat(batch)


def render_pair(
    points: torch.Tensor,
    conf: torch.Tensor,
    features: torch.Tensor,
    feature_rows: torch.Tensor,
    image_size: tuple[int, int],
    radius: float = 0.01,
    points_per_pixel: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render both clouds of n pairs into view i's camera: projections (2, n, C, Hr, Wr) and overlap mask (n, Hr, Wr).

    Args:
        points: (n, 2, H, W, 3) view i's and view j's point maps, both in view i's camera frame.
        conf: (n, 2, H, W) their confidences (they weight the canonical point map behind the focal).
        features: (M, H*W, C) per-pixel features (channels last) of the views, a shared table.
        feature_rows: (2, n) row of `features` that each cloud takes: view i's, then view j's.
        image_size: (Hr, Wr) of the renderings.
    Projections are 0 where no point lands; the mask (float 0/1) marks pixels covered in both renderings.
    Rendering runs in float32 outside autocast, as in the reference.
    """
    canon = canonical_point_map(points[:, 0], points[:, 1], conf[:, 0], conf[:, 1])
    # clouds in the order (k, row): all views i, then all views j, so that each half of the renders is one
    # contiguous block; both clouds of a row share view i's camera
    focal = estimate_focal(canon).repeat(2, 1)
    with torch.autocast(device_type=points.device.type, enabled=False):
        rendered = render_points(
            points.transpose(0, 1).flatten(0, 1).flatten(1, 2).float(),
            features,
            focal.float(),
            image_size=image_size,
            radius=radius,
            points_per_pixel=points_per_pixel,
            background=0.0,
            feature_index=feature_rows.flatten(),
        )
    projections = rendered.images.permute(0, 3, 1, 2).unflatten(0, (2, -1))  # (2, n, C, Hr, Wr)
    mask = (rendered.idx[..., 0] >= 0).unflatten(0, (2, -1)).all(dim=0).to(projections.dtype)
    return projections, mask


def pair_scores(
    score_map: torch.Tensor, mask: torch.Tensor, distance: Distance, eps: float = 1e-6, empty: str = "nan"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score of each pair from its score map and overlap mask (n, H, W): scores (n,) and `valid` (n,) bool.

    The score is the distance's masked reduction (``sum(map * mask) / (sum(mask) + eps)`` for MEt3R's cosine).
    `valid` is False where the mask is empty; such pairs score NaN (`empty="nan"`) or 0 (`empty="zero"`),
    selected with `torch.where`, so their gradient is 0 either way.
    """
    _check_empty(empty)
    if score_map.shape != mask.shape or score_map.ndim < 2:
        raise ValueError(f"score_map {tuple(score_map.shape)} and mask {tuple(mask.shape)} must both be (n, H, W)")
    valid = mask.sum((-2, -1)) > 0
    scores = distance.reduce(score_map, mask, eps)
    if empty == "zero":
        scores = torch.where(valid, scores, torch.zeros_like(scores))
    return scores, valid


class PairScores(NamedTuple):
    """What `score_pairs` returns for n (sample, pair) rows."""

    score: torch.Tensor  # (n,) per-pair score (see pair_scores)
    valid: torch.Tensor  # (n,) bool, the pair's renderings overlap
    fraction: torch.Tensor  # (n,) fraction of rendered pixels covered in both renderings
    mask: torch.Tensor  # (n, Hr, Wr) float 0/1 overlap mask
    score_map: torch.Tensor  # (n, Hr, Wr)
    projections: torch.Tensor  # (n, 2, C, Hr, Wr) renderings of view i's and view j's features


def score_pairs(
    points: torch.Tensor,
    conf: torch.Tensor,
    features: torch.Tensor,
    feature_rows: torch.Tensor,
    distance: Distance,
    image_size: tuple[int, int],
    radius: float = 0.01,
    points_per_pixel: int = 10,
    eps: float = 1e-6,
    empty: str = "nan",
) -> PairScores:
    """The network-free half of MEt3R for n rows: render both clouds (`render_pair`), compare, reduce (`pair_scores`)."""
    projections, mask = render_pair(points, conf, features, feature_rows, image_size, radius, points_per_pixel)
    with torch.autocast(device_type=points.device.type, enabled=False):  # scored in float32, as the reference
        # unbind, not two selects: the backward then stacks both gradients into one buffer instead of
        # zero-filling a full-size gradient per select and adding them (0.5 s less at V=2, 256x256)
        score_map = distance(*projections.unbind(0))
        score, valid = pair_scores(score_map, mask, distance, eps, empty)
    return PairScores(score, valid, mask.mean((-2, -1)), mask, score_map, projections.transpose(0, 1))


def fold_symmetric(
    scores: torch.Tensor, valid: torch.Tensor, reverse_scores: torch.Tensor, reverse_valid: torch.Tensor, empty: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each pair's two directions over those that overlap (the paper's symmetric formula): scores, valid."""
    _check_empty(empty)
    _check_valid(valid, scores)
    _check_valid(reverse_valid, reverse_scores)
    count = valid.to(scores.dtype) + reverse_valid.to(scores.dtype)
    total = torch.where(valid, scores, torch.zeros_like(scores)) + torch.where(
        reverse_valid, reverse_scores, torch.zeros_like(reverse_scores)
    )
    both = valid | reverse_valid
    fill = torch.full_like(total, float("nan") if empty == "nan" else 0.0)
    return torch.where(both, total / count.clamp_min(1), fill), both


def sample_scores(scores: torch.Tensor, valid: torch.Tensor, empty: str = "nan") -> torch.Tensor:
    """Per-sample score (B,) from per-pair scores (B, P): the mean over the pairs that overlap; NaN or 0 if none."""
    _check_empty(empty)
    _check_valid(valid, scores)
    count = valid.to(scores.dtype).sum(-1)
    total = torch.where(valid, scores, torch.zeros_like(scores)).sum(-1)
    fill = torch.full_like(total, float("nan") if empty == "nan" else 0.0)
    return torch.where(count > 0, total / count.clamp_min(1), fill)


def _check_empty(empty: str) -> None:
    if empty not in EMPTY_MODES:
        raise ValueError(f"empty must be one of {EMPTY_MODES}, got {empty!r}")


def _check_valid(valid: torch.Tensor, scores: torch.Tensor) -> None:
    if not (isinstance(valid, torch.Tensor) and valid.dtype == torch.bool and valid.shape == scores.shape):
        shape = tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be a bool tensor shaped like the scores {tuple(scores.shape)}, got {shape}")
