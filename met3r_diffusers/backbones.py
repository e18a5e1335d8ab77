"""The two kinds of network MEt3R runs, declared as protocols, and the adapters that give the metric one call each.

Geometry (point maps of a view pair in view i's camera frame), either

* `SharedEncoderGeometry`: `encode_views(images)` once per view and `decode_pair(...)` per pair (our DUSt3R /
  MASt3R: a view shared by several pairs is encoded once), or
* `PairGeometry`: the official call `backbone(view1, view2) -> (pred1, pred2)` (the original network object,
  or any stand-in), with `pred1["pts3d"]`, `pred2["pts3d_in_other_view"]` and both `"conf"`.

Features (per-pixel descriptors of one view), either

* `TwoStageFeatures`: `low_res(normalized)` then `upsample(low_res, guidance)` (our DINO + FeatUp, whose JBU
  stack is guided by an image the metric chooses), or
* a plain module `features(normalized) -> (N, C, h, w)`.

`geometry_adapter` / `feature_adapter` pick the form once, when the metric is built.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "FeatureAdapter", "GeometryAdapter", "PairGeometry", "SharedEncoderGeometry", "TwoStageFeatures",
    "feature_adapter", "geometry_adapter",
]

Encoded = tuple[torch.Tensor, ...]  # per-view state, every tensor (N, ...)


@runtime_checkable
class SharedEncoderGeometry(Protocol):
    """A geometry network that encodes views once and decodes any pair of encoded views."""

    def encode_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [-1, 1] -> tokens (N, L, D) and patch positions (N, L, 2)."""

    def decode_pair(
        self, tokens1: torch.Tensor, pos1: torch.Tensor, tokens2: torch.Tensor, pos2: torch.Tensor,
        shape1: tuple[int, int], shape2: tuple[int, int], descriptors: bool = True,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Predictions of both views, with the official output keys."""


@runtime_checkable
class PairGeometry(Protocol):
    """The official DUSt3R / MASt3R call signature."""

    def __call__(self, view1: dict, view2: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`view["img"]` (n, 3, H, W) in [-1, 1] -> (pred1, pred2)."""


@runtime_checkable
class TwoStageFeatures(Protocol):
    """A featuriser whose upsampler takes a guidance image (DINO + FeatUp)."""

    def low_res(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised (N, 3, H, W) -> low-resolution features (N, C, h, w)."""

    def upsample(self, low_res: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Low-resolution features and the guidance image (N, 3, H, W) -> high-resolution features."""


class GeometryAdapter:
    """One interface over both geometry forms: `encode` per view, `pair` per (sample, pair) row."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.shared = isinstance(backbone, SharedEncoderGeometry)

    def encode(self, images: torch.Tensor) -> Encoded:
        """Per-view state of (N, 3, H, W) images: the encoder's tokens and positions, or the images themselves."""
        if self.shared:
            return tuple(self.backbone.encode_views(images))
        return (images,)

    def pair(self, first: Encoded, second: Encoded, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Point maps (n, 2, H, W, 3) and confidences (n, 2, H, W) of n pairs, both views in view i's frame."""
        if self.shared:
            pred1, pred2 = self.backbone.decode_pair(*first, *second, shape, shape, descriptors=False)
        else:
            pred1, pred2 = self.backbone({"img": first[0], "instance": [""]}, {"img": second[0], "instance": [""]})
        points = torch.stack([pred1["pts3d"], pred2["pts3d_in_other_view"]], 1)
        return points, torch.stack([pred1["conf"], pred2["conf"]], 1)


class FeatureAdapter:
    """One interface over both feature forms: `features(normalized, guidance) -> (N, C, h, w)`."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.two_stage = isinstance(backbone, TwoStageFeatures)

    def features(self, normalized: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Features of ImageNet-normalised images; a two-stage featuriser's upsampler follows `guidance`."""
        if self.two_stage:
            return self.backbone.upsample(self.backbone.low_res(normalized), guidance)
        return self.backbone(normalized)


def geometry_adapter(backbone: nn.Module) -> GeometryAdapter:
    """Adapter for a geometry network; TypeError if it has neither form."""
    if not isinstance(backbone, (SharedEncoderGeometry, PairGeometry)):
        raise TypeError(
            f"backbone must be callable as backbone(view1, view2) or have encode_views/decode_pair, "
            f"got {type(backbone).__name__}"
        )
    return GeometryAdapter(backbone)


def feature_adapter(backbone: nn.Module) -> FeatureAdapter:
    """Adapter for a feature network; TypeError if it is not callable."""
    if not callable(backbone):
        raise TypeError(f"feature_backbone must be a module or callable, got {type(backbone).__name__}")
    return FeatureAdapter(backbone)
