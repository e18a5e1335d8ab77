"""Point splatting and alpha compositing in pure PyTorch, matching PyTorch3D as MEt3R uses it.

MEt3R renders each point cloud into view 1's camera with PyTorch3D's ``PointsRasterizer``
(camera rotation ``diag(-1, -1, 1)``, zero translation, NDC focal, ``bin_size=0``) followed by
``AlphaCompositor`` with weights ``1 - dists / r**2``. PyTorch3D's naive rasteriser tests every
point against every pixel; here each point is tested only against the few pixels inside its
disk, and the K nearest points per pixel are kept with one sort, so time and memory grow with
points x footprint rather than points x pixels.

Conventions (all reproduced exactly, see docs/render.md):

* NDC: +x points left, +y points up; the shorter image side spans [-1, 1], the longer one
  [-L/S, L/S]. Row 0 is the top of the image, column 0 its left.
* A point ``(X, Y, Z)`` projects to ``x = fx * (-X) / Z``, ``y = fy * (-Y) / Z``; points with
  ``Z < sqrt(finfo(dtype).tiny)`` (about 1e-19 in float32; PyTorch3D's limit is ``Z < 0``, the
  difference keeps ``1 / Z**2`` and so every gradient finite), any non-finite coordinate or a
  non-finite projection are never drawn. Non-finite features are not checked: they reach the
  pixels (and gradients) that the point reaches, as in any PyTorch operation.
* A point hits a pixel when its squared NDC distance to the pixel centre is ``< r**2``.
  Per pixel the K hits with the smallest Z are kept, nearest first, ties by packed index
  ``n * P + p``; unused slots hold ``idx = zbuf = dists = -1``.
* ``image = sum_k alpha_k * prod_{l<k} (1 - alpha_l) * f[idx_k]`` with
  ``alpha_k = 1 - dists_k / r**2``; pixels without any hit are ``background`` in every channel.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ImageSize = Union[int, Sequence[int]]

# Largest N * H * W * K accepted: the fragment buffers (idx, zbuf, dists) and the compositing
# temporaries take about 40 bytes per slot in float32, so ~11 GB at this limit (see docs/render.md).
MAX_FRAGMENT_SLOTS = 2**28

# Candidate (point, pixel) tests per rasterisation chunk, at least: points are tested in chunks of
# max(N * H * W * K, this) candidates, so the temporaries never outgrow the fragment buffers by more
# than a constant factor whatever the radius or the number of points.
_MIN_CHUNK_CANDIDATES = 2**22

# Extra pixels added to each side of a point's footprint so that float32 rounding of the
# footprint centre (< 1e-3 px for images up to 8192 px) never drops a pixel that the exact
# hit test accepts; the hit test itself decides which candidates are drawn.
_FOOTPRINT_MARGIN = 0.01


class RenderOutput(NamedTuple):
    """Result of `render_points`; same layout as PyTorch3D's fragments + composited images."""

    images: torch.Tensor  # (N, H, W, C) composited features, `background` where nothing lands
    idx: torch.Tensor  # (N, H, W, K) int64 packed point index n * P + p, -1 for unused slots
    zbuf: torch.Tensor  # (N, H, W, K) camera depth Z of the stored point, -1 for unused slots
    dists: torch.Tensor  # (N, H, W, K) squared NDC distance to the pixel centre, -1 if unused


def render_points(
    points: torch.Tensor,
    features: torch.Tensor,
    focal: torch.Tensor,
    image_size: ImageSize = 256,
    radius: float = 0.01,
    points_per_pixel: int = 10,
    background: float = -10000.0,
    backend: str = "torch",
    feature_index: torch.Tensor | None = None,
) -> RenderOutput:
    """Splat N point clouds with per-point features into an NDC pinhole camera and alpha-composite.

    Args:
        points: (N, P, 3) points (X, Y, Z) in the camera frame of the render (OpenCV axes).
        features: (N, P, C) per-point features, same dtype and device as `points`; or, with
            `feature_index`, a (M, P, C) table of which cloud n uses row `feature_index[n]`.
        focal: (N, 2) focal length (fx, fy) of each cloud's camera in NDC units.
        image_size: H and W of the render, an int for a square image or a pair (H, W).
        radius: disk radius of every point in NDC units.
        points_per_pixel: K, the number of nearest points kept and composited per pixel;
            N * H * W * K may not exceed `MAX_FRAGMENT_SLOTS` (2**28).
        background: value of every channel of pixels that no point hits.
        backend: "torch" (this implementation) or "pytorch3d" (calls PyTorch3D if installed).
        feature_index: optional (N,) integer rows of `features` (clouds that share features, such
            as the views of several pairs, then need no copy of them).

    Returns:
        `RenderOutput(images, idx, zbuf, dists)`; differentiable w.r.t. `features`, `points`
        and `focal` (through `dists`, `zbuf` and the compositing weights), like PyTorch3D.

    Raises:
        ValueError: naming the argument, for malformed input, features without channels, or a
            request whose fragment buffers would exceed `MAX_FRAGMENT_SLOTS` (raised before
            anything is allocated).
    """
    height, width = _check_inputs(
        points, features, focal, image_size, radius, points_per_pixel, background, feature_index
    )
    settings = (height, width, float(radius), int(points_per_pixel), float(background))
    if feature_index is not None:
        feature_index = feature_index.long()  # row arithmetic must not wrap; uint8 would index as a mask
    if backend == "torch":
        return _render_torch(points, features, feature_index, focal, *settings)
    if backend == "pytorch3d":
        if feature_index is not None:
            features = features[feature_index]
        return _render_pytorch3d(points, features, focal, *settings)
    raise ValueError(f"backend must be 'torch' or 'pytorch3d', got {backend!r}")


def overlap_mask(images: torch.Tensor, background: float = -10000.0) -> torch.Tensor:
    """MEt3R's overlap mask: 1.0 where both renders of a pair differ from `background` in every channel.

    Args:
        images: (2b, H, W, C) renders of b pairs, the two views of pair i at rows 2i and 2i+1
            (the order MEt3R renders them in).
        background: the background value used for rendering.

    Returns:
        (b, H, W) mask in `images`' dtype.
    """
    if images.dim() != 4 or images.shape[0] % 2 != 0:
        raise ValueError(f"images must have shape (2b, H, W, C), got {tuple(images.shape)}")
    covered = (images != background).all(dim=-1)
    return covered.unflatten(0, (-1, 2)).all(dim=1).to(images.dtype)


def _check_inputs(
    points, features, focal, image_size, radius, points_per_pixel, background, feature_index
) -> tuple[int, int]:
    for name, tensor in (("points", points), ("features", features), ("focal", focal)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (N, P, 3), got {tuple(points.shape)}")
    if points.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"points must be float32 or float64, got {points.dtype}")
    num_clouds, num_points = points.shape[:2]
    if feature_index is None:
        if features.dim() != 3 or features.shape[:2] != (num_clouds, num_points):
            raise ValueError(
                f"features must have shape (N, P, C) = ({num_clouds}, {num_points}, C) to match points, "
                f"got {tuple(features.shape)}"
            )
    else:
        if features.dim() != 3 or features.shape[1] != num_points:
            raise ValueError(
                f"with feature_index, features must have shape (M, P, C) with P = {num_points}, "
                f"got {tuple(features.shape)}"
            )
        if (
            not isinstance(feature_index, torch.Tensor)
            or feature_index.shape != (num_clouds,)
            or feature_index.dtype.is_floating_point
            or feature_index.dtype.is_complex
            or feature_index.dtype == torch.bool
        ):
            raise ValueError(f"feature_index must be an integer tensor of shape ({num_clouds},)")
        if feature_index.device != points.device:
            raise ValueError(f"feature_index must be on the device of points ({points.device})")
        if num_clouds and (feature_index.min() < 0 or feature_index.max() >= features.shape[0]):
            raise ValueError(f"feature_index must lie in [0, {features.shape[0]}) (the rows of features)")
    if focal.shape != (num_clouds, 2):
        raise ValueError(f"focal must have shape (N, 2) = ({num_clouds}, 2), got {tuple(focal.shape)}")
    for name, tensor in (("features", features), ("focal", focal)):
        if tensor.dtype != points.dtype:
            raise ValueError(f"{name} must have the dtype of points ({points.dtype}), got {tensor.dtype}")
        if tensor.device != points.device:
            raise ValueError(f"{name} must be on the device of points ({points.device}), got {tensor.device}")
    if _is_int(image_size):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list, torch.Size))
        or len(image_size) != 2
        or not all(_is_int(s) and s > 0 for s in image_size)
    ):
        raise ValueError(f"image_size must be a positive int or a pair of positive ints (H, W), got {image_size!r}")
    if not _is_real(radius) or not (0 < radius < math.inf):
        raise ValueError(f"radius must be a positive finite number, got {radius!r}")
    if not _is_int(points_per_pixel) or points_per_pixel <= 0:
        raise ValueError(f"points_per_pixel must be a positive int, got {points_per_pixel!r}")
    if not _is_real(background):
        raise ValueError(f"background must be a number, got {background!r}")
    if features.shape[-1] == 0:
        raise ValueError(f"features must have at least one channel (C > 0), got shape {tuple(features.shape)}")
    height, width = int(image_size[0]), int(image_size[1])
    slots = num_clouds * height * width * points_per_pixel
    if slots > MAX_FRAGMENT_SLOTS:
        raise ValueError(
            f"points_per_pixel={points_per_pixel} with {num_clouds} clouds at image_size=({height}, {width}) needs "
            f"N * H * W * K = {slots:,} fragment slots, more than MAX_FRAGMENT_SLOTS = {MAX_FRAGMENT_SLOTS:,} "
            f"(about 40 bytes each); lower points_per_pixel or image_size, or render fewer clouds per call"
        )
    return height, width


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _project(points: torch.Tensor, focal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NDC position of (..., 3) points under rotation diag(-1, -1, 1), in PyTorch3D's float order."""
    x = (focal[..., 0] * -points[..., 0]) / points[..., 2]
    y = (focal[..., 1] * -points[..., 1]) / points[..., 2]
    return x, y


def _pixel_centres(length: int, other: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """NDC centre of each pixel along an axis of `length` pixels, index 0 = top/left.

    Evaluated in the same float order as PyTorch3D (on the flipped index), which makes the
    squared distances bit-identical to its rasteriser.
    """
    ndc_range = torch.tensor(2.0, dtype=dtype, device=device)
    if length > other:
        ndc_range = (ndc_range * length) / other
    offset = ndc_range / 2
    flipped = torch.arange(length - 1, -1, -1, dtype=dtype, device=device)
    return (ndc_range * flipped + offset) / length - offset


def _min_depth(dtype: torch.dtype) -> float:
    """Smallest depth drawn: 1 / Z**2 (in the projection's gradient) stays a finite number of `dtype`."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _rasterize(
    points: torch.Tensor,
    focal: torch.Tensor,
    col_centres: torch.Tensor,
    row_centres: torch.Tensor,
    radius: float,
    num_kept: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find the K nearest hits of every pixel (no autograd); centres are the (W,) and (H,) pixel centres.

    Points are tested in chunks, each merged with the hits kept so far, so that memory stays
    proportional to N * H * W * K whatever the radius and the number of points.
    Returns, for the kept hits sorted by (pixel, depth, point index):
    `point` (M,) packed point index, `pixel` (M,) packed pixel index n*H*W + i*W + j,
    `slot` (M,) position in the flattened (N*H*W*K) fragment buffers, and `by_point` (M,)
    the permutation that lists the same hits sorted by point index.
    """
    num_clouds, num_points = points.shape[:2]
    height, width = row_centres.numel(), col_centres.numel()
    short_side = min(height, width)
    device = points.device
    radius_t = torch.tensor(radius, dtype=points.dtype, device=device)
    radius2 = radius_t * radius_t

    x, y = _project(points, focal[:, None, :])
    # Continuous column / row of the projection (pixel centres at integers) and disk radius in pixels.
    col = (width - 1 - x * short_side) / 2
    row = (height - 1 - y * short_side) / 2
    reach = radius * short_side / 2 + _FOOTPRINT_MARGIN
    drawable = (
        torch.isfinite(points).all(dim=-1)
        & (points[..., 2] >= _min_depth(points.dtype))
        & (col > -reach - 1)
        & (col < width + reach)
        & (row > -reach - 1)
        & (row < height + reach)
    )
    point = drawable.flatten().nonzero().squeeze(1)  # packed indices, ascending
    x, y, col, row = (t.flatten()[point] for t in (x, y, col, row))
    depth = points[..., 2].flatten()[point]

    # Candidate pixels: the integers inside [c - reach, c + reach] on each axis, clipped to the
    # image; a window of min(span, side) pixels placed inside the image holds all of them.
    span = math.floor(2 * reach) + 1
    span_row, span_col = min(span, height), min(span, width)
    first_row = torch.ceil(row - reach).clamp(0, height - span_row).long()
    first_col = torch.ceil(col - reach).clamp(0, width - span_col).long()
    steps_row, steps_col = torch.arange(span_row, device=device), torch.arange(span_col, device=device)
    budget = max(num_clouds * height * width * num_kept, _MIN_CHUNK_CANDIDATES)
    chunk = max(1, budget // (span_row * span_col))

    # Hits so far, in stream order (by point index, then pixel): (point, pixel, depth).
    stream: tuple[torch.Tensor, ...] = ()
    starts = range(0, max(point.numel(), 1), chunk)
    for start in starts:
        part = slice(start, start + chunk)
        cand_row = first_row[part, None] + steps_row  # (q, span_row)
        cand_col = first_col[part, None] + steps_col  # (q, span_col)
        dx = col_centres[cand_col] - x[part, None]
        dy = row_centres[cand_row] - y[part, None]
        dist2 = dx[:, None, :] * dx[:, None, :] + dy[:, :, None] * dy[:, :, None]  # (q, span_row, span_col)
        hit_q, hit_r, hit_c = (dist2 < radius2).nonzero(as_tuple=True)  # ordered by point index
        hit_point = point[part][hit_q]
        in_image = cand_row[hit_q, hit_r] * width + cand_col[hit_q, hit_c]
        hit_pixel = (hit_point // num_points) * (height * width) + in_image
        new = (hit_point, hit_pixel, depth[part][hit_q])
        # Earlier chunks hold smaller point indices, so appending keeps the stream order.
        stream = tuple(torch.cat(pair) for pair in zip(stream, new)) if stream else new
        hit_point, hit_pixel, hit_depth = stream

        # Sort by (pixel, depth), keeping the stream order for ties; rank within the pixel, keep K.
        order = _pixel_depth_order(hit_pixel, hit_depth)
        pixel = hit_pixel[order]
        position = torch.arange(pixel.numel(), device=device)
        starts_group = torch.ones_like(pixel, dtype=torch.bool)
        starts_group[1:] = pixel[1:] != pixel[:-1]
        rank = position - torch.where(starts_group, position, 0).cummax(dim=0).values
        keep = rank < num_kept
        kept_order = order[keep]
        # Position of each kept hit in the sorted list, at its stream position (-1: dropped).
        index_in_kept = torch.full_like(order, -1)
        index_in_kept[kept_order] = torch.arange(kept_order.numel(), device=device)
        in_stream = index_in_kept >= 0
        if start + chunk < point.numel():
            stream = tuple(t[in_stream] for t in stream)

    # The kept hits listed by point index: their sorted positions, in stream order.
    by_point = index_in_kept[in_stream]
    pixel = pixel[keep]
    return hit_point[kept_order], pixel, pixel * num_kept + rank[keep], by_point


def _pixel_depth_order(pixel: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Stable permutation sorting hits by (pixel, depth); hits have finite depth > 0."""
    if depth.dtype == torch.float32:
        # Positive finite float32 bit patterns sort like the values, so one int64 key does it
        # (pixel < 2**32 holds: N * H * W <= MAX_FRAGMENT_SLOTS = 2**28).
        key = pixel * 2**31 + depth.view(torch.int32).long()
        return torch.sort(key, stable=True).indices
    by_depth = torch.sort(depth, stable=True).indices
    return by_depth[torch.sort(pixel[by_depth], stable=True).indices]


class _WeightedGather(torch.autograd.Function):
    """out[pixel] = sum of weight * features[point] over the hits of each pixel (a sparse matmul).

    Hits are sorted by pixel (`offsets`, length num_pixels + 1, delimits each pixel's hits);
    `by_point` lists the same hits sorted by point for the transposed product in backward (None:
    sort them there).
    Pixels in `empty` are set to `background`.
    """

    @staticmethod
    def forward(ctx, weight, features, point, pixel, offsets, by_point, empty, background):
        out = F.embedding_bag(
            point, features, offsets, mode="sum", per_sample_weights=weight, include_last_offset=True
        )
        if background != 0.0:  # an empty bag already sums to 0
            out.masked_fill_(empty[:, None], background)
        ctx.save_for_backward(weight, features, point, pixel, offsets, by_point)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        weight, features, point, pixel, offsets, by_point = ctx.saved_tensors
        if by_point is None:
            by_point = torch.sort(point, stable=True).indices
        grad_weight = grad_features = None
        if ctx.needs_input_grad[0]:
            # grad_weight[e] = <grad_out[pixel_e], features[point_e]>, only at the hits.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                pattern = torch.sparse_csr_tensor(
                    offsets, point, weight, size=(grad_out.shape[0], features.shape[0]), check_invariants=False
                )
                grad_weight = torch.sparse.sampled_addmm(pattern, grad_out, features.t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            point_offsets = torch.zeros(features.shape[0] + 1, dtype=torch.long, device=point.device)
            torch.cumsum(torch.bincount(point, minlength=features.shape[0]), dim=0, out=point_offsets[1:])
            grad_features = F.embedding_bag(
                pixel[by_point],
                grad_out,
                point_offsets,
                mode="sum",
                per_sample_weights=weight[by_point],
                include_last_offset=True,
            )
        return grad_weight, grad_features, None, None, None, None, None, None


def _render_torch(points, features, feature_index, focal, height, width, radius, num_kept, background) -> RenderOutput:
    num_clouds, num_points, channels = points.shape[0], points.shape[1], features.shape[-1]
    num_pixels = num_clouds * height * width
    col_centres = _pixel_centres(width, height, points.dtype, points.device)
    row_centres = _pixel_centres(height, width, points.dtype, points.device)
    with torch.no_grad():
        point, pixel, slot, by_point = _rasterize(
            points.detach(), focal.detach(), col_centres, row_centres, radius, num_kept
        )

    # Differentiable recomputation of depth and squared distance for the kept hits only, so
    # points that are never stored (including non-finite ones) get exactly zero gradient.
    stored = points.reshape(-1, 3)[point]
    x, y = _project(stored, focal[point // num_points])
    pix_in_image = pixel % (height * width)
    dx = col_centres[pix_in_image % width] - x
    dy = row_centres[pix_in_image // width] - y
    dists = dx * dx + dy * dy

    def fragment(values: torch.Tensor, fill: float) -> torch.Tensor:
        buffer = torch.full((num_pixels * num_kept,), fill, dtype=values.dtype, device=values.device)
        return buffer.index_put((slot,), values).view(num_clouds, height, width, num_kept)

    # Front-to-back compositing: weight_k = alpha_k * prod_{l<k} (1 - alpha_l); empty slots have
    # alpha 0 and come after the used ones, so they change nothing.
    alpha = fragment(1 - dists / (radius * radius), 0.0).view(num_pixels, num_kept)
    transmittance = torch.cumprod(1 - alpha, dim=1)
    transmittance = torch.cat([torch.ones_like(transmittance[:, :1]), transmittance[:, :-1]], dim=1)
    weight = (alpha * transmittance).flatten()[slot]

    offsets = torch.zeros(num_pixels + 1, dtype=torch.long, device=points.device)
    torch.cumsum(torch.bincount(pixel, minlength=num_pixels), dim=0, out=offsets[1:])
    empty = offsets[1:] == offsets[:-1]
    if feature_index is None:
        feature_row = point
    else:  # the hit's point in the shared table; hits are no longer sorted by it
        feature_row, by_point = feature_index[point // num_points] * num_points + point % num_points, None
    images = _WeightedGather.apply(
        weight, features.reshape(-1, channels), feature_row, pixel, offsets, by_point, empty, background
    )
    return RenderOutput(
        images=images.view(num_clouds, height, width, channels),
        idx=fragment(point, -1),
        zbuf=fragment(stored[:, 2], -1.0),
        dists=fragment(dists, -1.0),
    )


def _render_pytorch3d(points, features, focal, height, width, radius, num_kept, background) -> RenderOutput:
    try:
        from pytorch3d.renderer import (
            AlphaCompositor,
            PerspectiveCameras,
            PointsRasterizationSettings,
            PointsRasterizer,
        )
        from pytorch3d.structures import Pointclouds
    except ImportError as err:
        raise ImportError(
            "render_points(backend='pytorch3d') needs PyTorch3D, which is not installed; "
            "use backend='torch' (the default) or install pytorch3d"
        ) from err
    num_clouds, channels = points.shape[0], features.shape[-1]
    rotation = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=points.dtype, device=points.device))
    cameras = PerspectiveCameras(
        focal_length=focal,
        R=rotation.expand(num_clouds, 3, 3),
        T=torch.zeros(num_clouds, 3, dtype=points.dtype, device=points.device),
        device=points.device,
    )
    settings = PointsRasterizationSettings(
        image_size=(height, width), radius=radius, points_per_pixel=num_kept, bin_size=0
    )
    clouds = Pointclouds(points=points, features=features)
    fragments = PointsRasterizer(cameras=cameras, raster_settings=settings)(clouds)
    idx = fragments.idx.long()
    weights = 1 - fragments.dists.permute(0, 3, 1, 2) / (radius * radius)
    images = AlphaCompositor(background_color=[background] * channels)(
        idx.permute(0, 3, 1, 2), weights, clouds.features_packed().permute(1, 0)
    )
    return RenderOutput(images.permute(0, 2, 3, 1), idx, fragments.zbuf, fragments.dists)
