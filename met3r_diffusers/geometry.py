"""MEt3R's camera set-up before rendering: canonical point map and focal-length estimate.

Both follow the reference implementation exactly, including its quirks (documented in
docs/render.md): the focal votes use integer pixel coordinates centred at (W/2, H/2), the
median ignores NaN votes but keeps +-inf ones and takes the lower middle value for an even
count, and the result is normalised as ``1 + f/W``, ``1 + f/H`` rather than PyTorch3D's
pinhole ``2 f / min(H, W)``.
"""

from __future__ import annotations

import torch

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
