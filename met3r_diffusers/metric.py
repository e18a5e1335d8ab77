"""MEt3R: multi-view consistency of generated images (Asim et al., CVPR 2025), in pure PyTorch.

For a view pair (i, j) the metric

1. predicts both views' point maps in view i's camera frame with DUSt3R / MASt3R (detached),
2. estimates a focal length from their confidence-weighted mean (`geometry.py`),
3. computes DINO + FeatUp features of every view (`models/featup.py`),
4. splats each view's features on its point map into view i's camera (`render.py`),
5. compares the two renderings pixel by pixel where both are covered (`distances.py`).

The numbers follow the reference implementation (met3r commit 92a75c6, the seed version),
checked against golden outputs in `tests/test_metric.py`. Beyond the reference: any number of
views with per-view work shared across pairs, NaN (not 0) for pairs without overlap, optional
symmetric scoring, user-supplied geometry, and `torch.inference_mode` when no gradient is needed.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from .distances import FEATURE_DISTANCES, get_distance, masked_mean, masked_psnr
from .geometry import canonical_point_map, estimate_focal
from .models.dino import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE
from .render import render_points
from .views import PairSpec, resolve_pairs

__all__ = ["DEFAULT_WEIGHTS", "MEt3R", "MEt3REvaluator", "MEt3ROutput", "geometry_from_cameras"]

# Hugging Face repo ids of the geometry checkpoints the reference uses.
DEFAULT_WEIGHTS = {
    "mast3r": "naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric",
    "dust3r": "naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt",
}
# The torch.hub name the seed passes as `featup_weights`; it means "FeatUp's official checkpoint".
_FEATUP_HUB_NAME = "mhamilton723/FeatUp"

# What differs between the two published versions of the reference (see ../shared/parity/met3r):
# the FeatUp guidance image and the two eps of the score.
REFERENCES = {
    "seed": {"guidance": "normalized", "cosine_eps": 1e-3, "mean_eps": 1e-6},  # met3r 92a75c6
    "head": {"guidance": "image", "cosine_eps": 1e-5, "mean_eps": 1e-5},  # met3r 3259e41
}
# Inputs may exceed [-1, 1] by this much (decoder overshoot, resampling) before they are rejected.
_RANGE_TOLERANCE = 1e-3

ImageSize = Union[int, Sequence[int], None]


@dataclass
class MEt3ROutput:
    """Result of `MEt3R.forward`. Lower scores are more consistent (higher for distance="psnr" / "ssim").

    With a single pair the maps have no pair dimension: `overlap_mask`, `score_map` (B, H, W),
    `projections` (B, 2, C, H, W); with P > 1 pairs they are (B, P, H, W) and (B, P, 2, C, H, W).
    Maps are None unless requested. Iterating yields `score` followed by the requested maps, in
    the reference's tuple order, so `score, mask, score_map, proj = metric(...)` still works.
    """

    score: torch.Tensor  # (B,) mean over pairs with overlap; NaN if no pair overlaps
    pair_scores: torch.Tensor  # (B, P) one score per pair; NaN where the overlap is empty
    overlap_fraction: torch.Tensor  # (B, P) fraction of rendered pixels covered in both renderings
    pairs: list[tuple[int, int]]  # the P scored (i, j) pairs, in order
    overlap_mask: torch.Tensor | None = None  # float 0/1
    score_map: torch.Tensor | None = None
    projections: torch.Tensor | None = None  # renderings of view i and view j, 0 where not covered

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.score
        for value in (self.overlap_mask, self.score_map, self.projections):
            if value is not None:
                yield value


class MEt3R(nn.Module):
    """The MEt3R consistency metric: images (B, V, 3, H, W) in [-1, 1] -> `MEt3ROutput`.

    Args:
        img_size: side of the square rendering; None renders at the input resolution.
        use_norm: FeatUp's ChannelNorm on the DINO features (selects the matching checkpoint).
        backbone: "mast3r", "dust3r" or a module with the official call signature
            `backbone(view1, view2) -> (pred1, pred2)` (ours, or the original network object).
        feature_backbone: "dino16" or a module mapping ImageNet-normalised images (N, 3, H, W) to
            features (N, C, h, w) (e.g. `DinoFeatUp`). Only used by distance="cosine".
        upsampler: "featup" (FeatUp's JBU stack) or a weight-free "bilinear" / "nearest" / "bicubic".
        distance: "cosine" on features (MEt3R), or "mse" / "rmse" / "psnr" / "ssim" / "lpips" on RGB.
        freeze: freeze every weight and keep the networks in eval mode.
        symmetric: score each pair in both directions and average (the paper's formula; the
            reference code scores one direction); the returned maps are those of the (i, j) direction, and
            a pair whose one direction has no overlap gets the other direction's score.
        reference: "seed" (met3r 92a75c6: FeatUp guided by the normalised image, eps 1e-3 / 1e-6)
            or "head" (met3r 3259e41: guided by the [0, 1] image, eps 1e-5 / 1e-5).
        backbone_weights: hub id, local directory or `.pth` for the geometry network.
        feature_backbone_weights: local path or URL of the FeatUp checkpoint (default: the official one).
        radius, points_per_pixel: point rendering settings (NDC radius, points kept per pixel).
        chunk_size: at most this many views (features, encoder) or (sample, pair) rows (decoder,
            rendering) per batch, bounding peak memory (the default keeps V=8 at 256x256 under 6 GB on CPU); None
            processes everything at once (faster on a large GPU).
        cache_dir, local_files_only: passed to the weight downloads.

    The seed's argument names `feat_backbone`, `featup_weights`, `dust3r_weights` and
    `use_mast3r_dust3r` are accepted as aliases.
    """

    def __init__(
        self,
        img_size: int | None = 256,
        use_norm: bool = True,
        backbone: str | nn.Module = "mast3r",
        feature_backbone: str | nn.Module = "dino16",
        upsampler: str = "featup",
        distance: str = "cosine",
        freeze: bool = True,
        symmetric: bool = False,
        reference: str = "seed",
        backbone_weights: str | None = None,
        feature_backbone_weights: str | None = None,
        radius: float = 0.01,
        points_per_pixel: int = 10,
        chunk_size: int | None = 2,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        **seed_aliases: Any,
    ):
        super().__init__()
        backbone, feature_backbone, backbone_weights, feature_backbone_weights = _apply_seed_aliases(
            seed_aliases, backbone, feature_backbone, backbone_weights, feature_backbone_weights
        )
        if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
            raise ValueError(f"img_size must be a positive int or None, got {img_size!r}")
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {tuple(REFERENCES)}, got {reference!r}")
        if not (isinstance(radius, (int, float)) and 0 < radius < math.inf):
            raise ValueError(f"radius must be a positive number, got {radius!r}")
        if isinstance(points_per_pixel, bool) or not isinstance(points_per_pixel, int) or points_per_pixel < 1:
            raise ValueError(f"points_per_pixel must be a positive int, got {points_per_pixel!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
        settings = REFERENCES[reference]
        self.img_size = img_size
        self.distance = distance
        self.symmetric = symmetric
        self.reference = reference
        self.radius = float(radius)
        self.points_per_pixel = points_per_pixel
        self.chunk_size = chunk_size
        self._guidance = settings["guidance"]
        self._mean_eps = settings["mean_eps"]
        self._distance_fn = get_distance(distance, settings["cosine_eps"])
        load = {"cache_dir": cache_dir, "local_files_only": local_files_only}

        self.backbone = _build_backbone(backbone, backbone_weights, load)
        self.feature_backbone = None
        if distance in FEATURE_DISTANCES:
            self.feature_backbone = _build_feature_backbone(
                feature_backbone, feature_backbone_weights, use_norm, upsampler, cache_dir
            )
        self.frozen = bool(freeze)
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> MEt3R:
        """A frozen metric stays in eval mode."""
        return super().train(mode and not self.frozen)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        images: torch.Tensor,
        pairs: PairSpec = None,
        return_overlap_mask: bool = False,
        return_score_map: bool = False,
        return_projections: bool = False,
        geometry: dict[str, torch.Tensor] | None = None,
    ) -> MEt3ROutput:
        """Score view pairs of `images` (B, V, 3, H, W) in [-1, 1].

        Args:
            pairs: "adjacent" (default), "all", "reference" (view 0 against each) or a list of (i, j);
                view i's camera is the one rendered into.
            return_overlap_mask, return_score_map, return_projections: also return these maps.
            geometry: known point maps instead of the geometry network: {"pts3d": (B, P, 2, H, W, 3),
                "conf": (B, P, 2, H, W)}, for each pair view i's and view j's point maps in view i's
                camera frame (OpenCV axes; P may be omitted for one pair); see `geometry_from_cameras`.
                With symmetric=True it must hold both directions: the P pairs, then the P reversed ones.
        """
        self._check_images(images, needs_networks=geometry is None)
        batch, num_views = images.shape[:2]
        pair_list = resolve_pairs(pairs, num_views)
        directed = pair_list + [(j, i) for i, j in pair_list] if self.symmetric else pair_list
        wants_grad = torch.is_grad_enabled() and (
            images.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        # views that no pair uses are neither encoded nor featurised
        used = sorted({view for pair in directed for view in pair})
        local = {view: k for k, view in enumerate(used)}
        directed_local = [(local[i], local[j]) for i, j in directed]
        views = images if len(used) == num_views else images[:, used]
        with contextlib.nullcontext() if wants_grad else torch.inference_mode():
            if geometry is None:
                points, conf = self._geometry(views, directed_local)
            else:
                points, conf = _check_geometry(geometry, batch, len(directed), images)
            features = self._features(views)
            results = self._score_pairs(views, features, points, conf, directed_local, return_projections)
        if not wants_grad:  # ordinary tensors for the caller (inference tensors refuse autograd and in-place edits)
            results = {key: value.clone() for key, value in results.items()}
        return self._collect(results, pair_list, return_overlap_mask, return_score_map, return_projections)

    def _check_images(self, images: torch.Tensor, needs_networks: bool) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must have shape (B, V, 3, H, W), got {tuple(images.shape)}")
        if images.shape[1] < 2:
            raise ValueError(f"images must hold at least 2 views per sample (V >= 2), got V={images.shape[1]}")
        if images.shape[0] == 0:
            raise ValueError("images holds no sample (B=0)")
        height, width = images.shape[-2:]
        if (needs_networks or self.feature_backbone is not None) and (height % PATCH_SIZE or width % PATCH_SIZE):
            raise ValueError(f"images: H and W must be multiples of {PATCH_SIZE}, got {height}x{width}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor in [-1, 1], got {images.dtype}")
        parameter = next(self.parameters(), None)
        if parameter is not None and images.device != parameter.device:
            raise ValueError(
                f"images are on {images.device} but the metric is on {parameter.device}: move one of them (.to())"
            )
        if parameter is not None and images.dtype != parameter.dtype and not _autocast_enabled(images.device.type):
            raise ValueError(
                f"images are {images.dtype} but the metric's weights are {parameter.dtype}: convert the images, "
                f"the metric (metric.to(dtype)), or run under torch.autocast"
            )
        finite = torch.isfinite(images)
        if not bool(finite.all()):
            raise ValueError(f"images contain {int((~finite).sum())} non-finite values (NaN or inf)")
        low, high = float(images.detach().min()), float(images.detach().max())
        if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"images must be in [-1, 1], got values in [{low:.4g}, {high:.4g}] "
                f"(for [0, 1] images pass 2 * images - 1)"
            )

    def _chunks(self, total: int) -> Iterator[slice]:
        step = self.chunk_size or total
        for start in range(0, total, step):
            yield slice(start, min(start + step, total))

    @torch.no_grad()
    def _geometry(self, images: torch.Tensor, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Point maps (B, P, 2, H, W, 3) and confidences (B, P, 2, H, W) of the pairs, in view i's frame.

        Our DUSt3R / MASt3R encode every view once and decode each pair from the shared tokens; any
        other backbone is called on the pairs' images. At most `chunk_size` (sample, pair) rows at a time.
        """
        batch, num_views = images.shape[:2]
        sample, first, second = _pair_rows(batch, pairs, images.device)
        shape = tuple(images.shape[-2:])
        shared = hasattr(self.backbone, "encode_views") and hasattr(self.backbone, "decode_pair")
        if shared:
            flat = images.flatten(0, 1)
            encoded = [self.backbone.encode_views(flat[part]) for part in self._chunks(flat.shape[0])]
            tokens = torch.cat([t for t, _ in encoded]).unflatten(0, (batch, num_views))
            positions = torch.cat([p for _, p in encoded]).unflatten(0, (batch, num_views))
        points, conf = [], []
        for part in self._chunks(sample.shape[0]):
            b, i, j = sample[part], first[part], second[part]
            if shared:
                pred1, pred2 = self.backbone.decode_pair(
                    tokens[b, i], positions[b, i], tokens[b, j], positions[b, j], shape, shape, descriptors=False
                )
            else:
                pred1, pred2 = self.backbone(
                    {"img": images[b, i], "instance": [""]}, {"img": images[b, j], "instance": [""]}
                )
            points.append(torch.stack([pred1["pts3d"], pred2["pts3d_in_other_view"]], 1))
            conf.append(torch.stack([pred1["conf"], pred2["conf"]], 1))
        size = (batch, len(pairs))
        return torch.cat(points).unflatten(0, size).float(), torch.cat(conf).unflatten(0, size).float()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel features of every view, channels last (B, V, H*W, C): upsampled DINO features (at least
        float32), or the [0, 1] image for RGB distances. Channels last is the layout the renderer reads, made
        once per view."""
        batch, num_views, _, height, width = images.shape
        image01 = (images.flatten(0, 1) + 1) / 2
        if self.feature_backbone is None:
            return image01.flatten(2).transpose(1, 2).unflatten(0, (batch, num_views))
        mean = torch.tensor(IMAGENET_MEAN, dtype=image01.dtype, device=image01.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=image01.dtype, device=image01.device).view(3, 1, 1)
        normalized = (image01 - mean) / std
        guidance = normalized if self._guidance == "normalized" else image01
        two_stage = hasattr(self.feature_backbone, "low_res") and hasattr(self.feature_backbone, "upsample")
        features = None  # filled chunk by chunk (no list of chunks and concatenated copy at once)
        for part in self._chunks(normalized.shape[0]):
            if two_stage:
                low_res = self.feature_backbone.low_res(normalized[part])
                high_res = self.feature_backbone.upsample(low_res, guidance[part])
            else:
                high_res = self.feature_backbone(normalized[part])
            if tuple(high_res.shape[-2:]) != (height, width):
                high_res = F.interpolate(high_res, (height, width), mode="bilinear", align_corners=False)
            high_res = high_res.flatten(2).transpose(1, 2)  # (n, H*W, C)
            if features is None:
                dtype = torch.promote_types(high_res.dtype, torch.float32)  # bf16 / fp16 under autocast -> fp32
                features = high_res.new_empty(batch * num_views, *high_res.shape[1:], dtype=dtype)
            features[part] = high_res
        return features.unflatten(0, (batch, num_views))

    def _score_pairs(
        self,
        images: torch.Tensor,
        features: torch.Tensor,
        points: torch.Tensor,
        conf: torch.Tensor,
        pairs: list[tuple[int, int]],
        keep_projections: bool,
    ) -> dict[str, torch.Tensor]:
        """Render and score every pair, at most `chunk_size` (sample, pair) rows at a time: (B, P, ...) tensors."""
        batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        render_size = (height, width) if self.img_size is None else (self.img_size, self.img_size)
        sample, first, second = _pair_rows(batch, pairs, images.device)
        points, conf = points.flatten(0, 1), conf.flatten(0, 1)  # (B*P, 2, H, W, 3), (B*P, 2, H, W)
        num_views = features.shape[1]
        feature_table = features.flatten(0, 1).float()  # (B*V, H*W, C), each cloud picks its view's row
        results: dict[str, list[torch.Tensor]] = {"score": [], "fraction": [], "mask": [], "map": [], "proj": []}
        for part in self._chunks(sample.shape[0]):
            pts, cf = points[part], conf[part]
            canon = canonical_point_map(pts[:, 0], pts[:, 1], cf[:, 0], cf[:, 1])
            # clouds in the order (k, row): all views i, then all views j, so that each half of the
            # renders is one contiguous block; both clouds of a row share view i's camera
            focal = estimate_focal(canon).repeat(2, 1)
            views = torch.stack([first[part], second[part]])  # (2, n): view i, view j
            cloud_rows = (sample[part] * num_views + views).flatten()  # (2*n,)
            # rendering and scoring run in float32 outside autocast, as in the reference
            with torch.autocast(device_type=images.device.type, enabled=False):
                rendered = render_points(
                    pts.transpose(0, 1).flatten(0, 1).flatten(1, 2).float(),
                    feature_table,
                    focal.float(),
                    image_size=render_size,
                    radius=self.radius,
                    points_per_pixel=self.points_per_pixel,
                    background=0.0,
                    feature_index=cloud_rows,
                )
                # (2*n, Hr, Wr, C) -> (2, n, C, Hr, Wr); pixels without any point are 0
                projections = rendered.images.permute(0, 3, 1, 2).unflatten(0, (2, -1))
                mask = (rendered.idx[..., 0] >= 0).unflatten(0, (2, -1)).all(dim=0).to(projections.dtype)
                score_map = self._distance_fn(projections[0], projections[1])
                mean = masked_psnr if self.distance == "psnr" else masked_mean
                results["score"].append(mean(score_map, mask, self._mean_eps))
            results["fraction"].append(mask.mean((-2, -1)))
            results["mask"].append(mask)
            results["map"].append(score_map)
            if keep_projections:
                results["proj"].append(projections.transpose(0, 1))
        return {key: torch.cat(value).unflatten(0, (batch, len(pairs))) for key, value in results.items() if value}

    def _collect(
        self,
        results: dict[str, torch.Tensor],
        pairs: list[tuple[int, int]],
        return_overlap_mask: bool,
        return_score_map: bool,
        return_projections: bool,
    ) -> MEt3ROutput:
        """Fold the directed results into the output (averaging both directions when symmetric)."""
        num = len(pairs)
        pair_scores, fraction = results["score"][:, :num], results["fraction"][:, :num]
        if self.symmetric:
            pair_scores = torch.stack([pair_scores, results["score"][:, num:]]).nanmean(0)
            fraction = (fraction + results["fraction"][:, num:]) / 2
        if num == 1:
            score = pair_scores[:, 0]
        else:
            with warnings.catch_warnings():  # a sample whose pairs all lack overlap is NaN, by design
                warnings.simplefilter("ignore")
                score = pair_scores.nanmean(1)

        def maps(key: str, wanted: bool) -> torch.Tensor | None:
            if not wanted:
                return None
            value = results[key][:, :num]
            return value[:, 0] if num == 1 else value

        return MEt3ROutput(
            score=score,
            pair_scores=pair_scores,
            overlap_fraction=fraction,
            pairs=list(pairs),
            overlap_mask=maps("mask", return_overlap_mask),
            score_map=maps("map", return_score_map),
            projections=maps("proj", return_projections),
        )


# ---------------------------------------------------------------------- construction helpers


def _pair_rows(batch: int, pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Sample index, view i and view j of every (sample, pair) row, rows in (b, pair) order: three (B*P,) tensors."""
    index = torch.tensor(pairs, device=device)  # (P, 2)
    sample = torch.arange(batch, device=device).repeat_interleave(len(pairs))
    return sample, index[:, 0].repeat(batch), index[:, 1].repeat(batch)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()

_SEED_ALIASES = ("feat_backbone", "featup_weights", "dust3r_weights", "use_mast3r_dust3r")


def _apply_seed_aliases(
    aliases: dict[str, Any],
    backbone: str | nn.Module,
    feature_backbone: str | nn.Module,
    backbone_weights: str | None,
    feature_backbone_weights: str | None,
) -> tuple[Any, Any, str | None, str | None]:
    """Map the seed's constructor names onto ours (they win over the defaults they replace)."""
    unknown = sorted(set(aliases) - set(_SEED_ALIASES))
    if unknown:
        raise TypeError(f"MEt3R got unexpected keyword arguments {unknown}")
    if "feat_backbone" in aliases:
        feature_backbone = aliases["feat_backbone"]
    if "use_mast3r_dust3r" in aliases and isinstance(backbone, str):
        backbone = "mast3r" if aliases["use_mast3r_dust3r"] else "dust3r"
    if "dust3r_weights" in aliases:
        backbone_weights = str(aliases["dust3r_weights"])
        # the seed's default id names MASt3R even when use_mast3r_dust3r=False asks for DUSt3R
        if backbone == "dust3r" and backbone_weights == DEFAULT_WEIGHTS["mast3r"]:
            backbone_weights = None
    if "featup_weights" in aliases:
        weights = str(aliases["featup_weights"])
        feature_backbone_weights = None if weights == _FEATUP_HUB_NAME else weights
    return backbone, feature_backbone, backbone_weights, feature_backbone_weights


def _build_backbone(backbone: str | nn.Module, weights: str | None, load: dict[str, Any]) -> nn.Module:
    if isinstance(backbone, nn.Module):
        return backbone
    if backbone not in DEFAULT_WEIGHTS:
        raise ValueError(f"backbone must be one of {tuple(DEFAULT_WEIGHTS)} or an nn.Module, got {backbone!r}")
    from .models import DUSt3R, MASt3R

    model_class = MASt3R if backbone == "mast3r" else DUSt3R
    return model_class.from_pretrained(weights or DEFAULT_WEIGHTS[backbone], **load)


def _build_feature_backbone(
    feature_backbone: str | nn.Module, weights: str | None, use_norm: bool, upsampler: str, cache_dir: str | None
) -> nn.Module:
    if isinstance(feature_backbone, nn.Module):
        return feature_backbone
    from .models import DinoFeatUp
    from .models.featup import FEATURE_BACKBONES

    if feature_backbone not in FEATURE_BACKBONES:
        raise ValueError(
            f"feature_backbone must be one of {FEATURE_BACKBONES} or an nn.Module, got {feature_backbone!r}"
        )
    return DinoFeatUp.from_pretrained(weights, cache_dir=cache_dir, use_norm=use_norm, upsampler=upsampler)


def _check_geometry(
    geometry: dict[str, torch.Tensor], batch: int, num_pairs: int, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate user-supplied geometry; returns point maps (B, P, 2, H, W, 3) and confidences (B, P, 2, H, W)."""
    if not isinstance(geometry, dict) or "pts3d" not in geometry:
        raise ValueError('geometry must be a dict with "pts3d" (B, P, 2, H, W, 3) and optionally "conf"')
    height, width = images.shape[-2:]
    points = geometry["pts3d"]
    if points.ndim == 5:
        points = points[:, None]
    expected = (batch, num_pairs, 2, height, width, 3)
    if tuple(points.shape) != expected:
        raise ValueError(f'geometry["pts3d"] must have shape {expected} (B, P, 2, H, W, 3), got {tuple(points.shape)}')
    conf = geometry.get("conf")
    if conf is None:
        conf = torch.ones(expected[:-1], dtype=points.dtype, device=points.device)
    elif conf.ndim == 4:
        conf = conf[:, None]
    if tuple(conf.shape) != expected[:-1]:
        raise ValueError(f'geometry["conf"] must have shape {expected[:-1]} (B, P, 2, H, W), got {tuple(conf.shape)}')
    if points.device != images.device or conf.device != images.device:
        raise ValueError(f"geometry must be on the device of the images ({images.device})")
    return points.detach().float(), conf.detach().float()


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


# ---------------------------------------------------------------------- accumulating evaluator


class MEt3REvaluator:
    """Accumulate MEt3R over batches, torchmetrics style: `update(images)`, `compute()`, `reset()`.

    `compute()` gathers the per-sample results of every process when torch.distributed is
    initialised, so each process returns the same numbers.
    """

    def __init__(self, metric: nn.Module, pairs: PairSpec = None):
        self.metric = metric
        self.pairs = pairs
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._scores: list[torch.Tensor] = []
        self._pair_scores: list[torch.Tensor] = []
        self._fractions: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, images: torch.Tensor, **kwargs: Any) -> MEt3ROutput:
        """Score one batch (B, V, 3, H, W) and keep its per-sample results; returns the batch's output."""
        output = self.metric(images, pairs=self.pairs, **kwargs)
        if self._pair_scores and output.pair_scores.shape[1] != self._pair_scores[0].shape[1]:
            raise ValueError("every batch must score the same number of pairs (same V and pairs)")
        self._scores.append(output.score.detach().float().cpu())
        self._pair_scores.append(output.pair_scores.detach().float().cpu())
        self._fractions.append(output.overlap_fraction.detach().float().cpu())
        return output

    def compute(self) -> dict[str, Any]:
        """Means over all samples seen (by all processes): "score", "pair_scores" (P,), "overlap_fraction",
        "num_samples" and "num_empty" (samples whose pairs all lack overlap, left out of the mean)."""
        if not self._scores:
            raise RuntimeError("MEt3REvaluator.compute() called before any update()")
        scores = _gather(torch.cat(self._scores))
        pair_scores = _gather(torch.cat(self._pair_scores))
        fractions = _gather(torch.cat(self._fractions))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {
                "score": scores.nanmean(),
                "pair_scores": pair_scores.nanmean(0),
                "overlap_fraction": fractions.mean(),
                "num_samples": scores.shape[0],
                "num_empty": int(scores.isnan().sum()),
            }


def _gather(values: torch.Tensor) -> torch.Tensor:
    """Concatenate `values` (N, ...) over all processes (sizes may differ); identity without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    size = torch.tensor([values.shape[0]], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest, *values.shape[1:]), math.nan, device=device)
    padded[: values.shape[0]] = values.to(device)
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)]).cpu()
