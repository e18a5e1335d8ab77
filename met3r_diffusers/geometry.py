"""Camera helpers: known geometry (depth + extrinsics) in the form `MEt3R.forward(geometry=...)` takes.

`canonical_point_map` and `estimate_focal`, MEt3R's camera set-up before rendering, live in `functional.py`
(re-exported here, where earlier versions defined them).
"""

from __future__ import annotations

import torch

from .functional import canonical_point_map, estimate_focal
from .pairs import PairSpec, resolve_pairs

__all__ = ["canonical_point_map", "estimate_focal", "geometry_from_cameras"]


def geometry_from_cameras(
    world_points: torch.Tensor,
    world_to_camera: torch.Tensor,
    pairs: PairSpec = None,
    conf: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Known geometry as `MEt3R.forward(geometry=...)` takes it: each pair's point maps in view i's camera.

    Args:
        world_points: (B, V, H, W, 3) per-pixel world points of every view (e.g. unprojected depth).
        world_to_camera: (B, V, 4, 4) extrinsics mapping world points to each view's camera frame
            (OpenCV axes: x right, y down, z forward).
        pairs: the pairs that will be scored (same meaning as in `MEt3R.forward`).
        conf: optional (B, V, H, W) confidences (>= 1, as DUSt3R's); uniform when omitted.
    """
    if world_points.ndim != 5 or world_points.shape[-1] != 3:
        raise ValueError(f"world_points must have shape (B, V, H, W, 3), got {tuple(world_points.shape)}")
    batch, num_views = world_points.shape[:2]
    if tuple(world_to_camera.shape) != (batch, num_views, 4, 4):
        raise ValueError(
            f"world_to_camera must have shape (B, V, 4, 4) = ({batch}, {num_views}, 4, 4), "
            f"got {tuple(world_to_camera.shape)}"
        )
    if conf is None:
        conf = torch.full(world_points.shape[:-1], 2.0, dtype=world_points.dtype, device=world_points.device)
    elif tuple(conf.shape) != tuple(world_points.shape[:-1]):
        raise ValueError(f"conf must have shape (B, V, H, W) = {tuple(world_points.shape[:-1])}, got {tuple(conf.shape)}")
    index = torch.tensor(resolve_pairs(pairs, num_views), device=world_points.device)  # (P, 2)
    rotation = world_to_camera[:, index[:, 0], None, :3, :3]  # (B, P, 1, 3, 3): camera i of each pair
    translation = world_to_camera[:, index[:, 0], None, :3, 3]  # (B, P, 1, 3)
    points = world_points[:, index]  # (B, P, 2, H, W, 3)
    in_camera = torch.einsum("bpkij,bpkhwj->bpkhwi", rotation, points) + translation[:, :, :, None, None]
    return {"pts3d": in_camera, "conf": conf[:, index]}
