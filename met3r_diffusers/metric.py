"""MEt3R: multi-view consistency of generated images (Asim et al., CVPR 2025), in pure PyTorch.

For a view pair (i, j) the metric runs four stages, each visible in `MEt3R.forward`:

1. geometry: both views' point maps in view i's camera frame from DUSt3R / MASt3R, detached
   (`MEt3R.compute_geometry`; backbone forms in `backbones.py`);
2. features: DINO + FeatUp features of every view, at the input resolution (`MEt3R.compute_features`);
3. render + score: canonical point map -> focal -> both clouds splatted into camera i -> masked
   distance -> per-pair score (`functional.score_pairs`);
4. aggregation: symmetric directions and pairs folded into per-sample scores (`functional.sample_scores`).

The numbers follow the reference implementation (met3r commit 92a75c6, the seed version),
checked against golden outputs in `tests/test_metric.py`. Beyond the reference: any number of
views with per-view work shared across pairs, NaN (not 0) for pairs without overlap (or 0 with
`empty="zero"`, the NaN-free objective), optional symmetric scoring, user-supplied geometry, and
`torch.inference_mode` when no gradient is needed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from .backbones import feature_adapter, geometry_adapter
from .distances import get_distance
from .geometry import geometry_from_cameras
from .hub import DEFAULT_REPO_IDS, download_weights
from .models.compile import compile_units
from .models.dino import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE
from .models.featup import UPSAMPLERS
from .pairs import PairSpec, resolve_pairs
from .validation import check_finite, check_positive_int

__all__ = ["DEFAULT_WEIGHTS", "MEt3R", "MEt3RConfig", "MEt3ROutput", "REFERENCES", "geometry_from_cameras"]

logger = logging.getLogger(__name__)

# Hugging Face repo ids of the geometry checkpoints the reference uses.
DEFAULT_WEIGHTS = DEFAULT_REPO_IDS
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

    score: torch.Tensor  # (B,) mean over pairs with overlap; NaN (0 with empty="zero") if no pair overlaps
    pair_scores: torch.Tensor  # (B, P) one score per pair; NaN (0 with empty="zero") where the overlap is empty
    overlap_fraction: torch.Tensor  # (B, P) fraction of rendered pixels covered in both renderings
    pairs: list[tuple[int, int]]  # the P scored (i, j) pairs, in order
    overlap_mask: torch.Tensor | None = None  # float 0/1
    score_map: torch.Tensor | None = None
    projections: torch.Tensor | None = None  # renderings of view i and view j, 0 where not covered
    valid: torch.Tensor | None = None  # (B, P) bool: the pair's renderings overlap (its score means something)

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.score
        for value in (self.overlap_mask, self.score_map, self.projections):
            if value is not None:
                yield value


@dataclass
class MEt3RConfig:
    """The settings of a `MEt3R` (its constructor's arguments, networks named by string); see `MEt3R`."""

    img_size: int | None = 256
    use_norm: bool = True
    backbone: str = "mast3r"
    feature_backbone: str = "dino16"
    upsampler: str = "featup"
    distance: str = "cosine"
    freeze: bool = True
    symmetric: bool = False
    reference: str = "seed"
    backbone_weights: str | None = None
    feature_backbone_weights: str | None = None
    radius: float = 0.01
    points_per_pixel: int = 10
    chunk_size: int | None = 2
    cache_dir: str | None = None
    local_files_only: bool | None = None
    compile: bool = False


class MEt3R(nn.Module):
    """The MEt3R consistency metric: images (B, V, 3, H, W) in [-1, 1] -> `MEt3ROutput`.

    Args:
        img_size: side of the square rendering; None renders at the input resolution.
        use_norm: FeatUp's ChannelNorm on the DINO features (selects the matching checkpoint).
        backbone: "mast3r", "dust3r" or a module of either geometry form in `backbones.py` (ours, the
            original network object, or a stand-in with the official `backbone(view1, view2)` call).
        feature_backbone: "dino16" or a module of either feature form in `backbones.py`, mapping
            ImageNet-normalised images (N, 3, H, W) to features (N, C, h, w). Only used by distance="cosine".
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
        compile: `torch.compile` the networks' repeated blocks (MASt3R/DUSt3R encoder and decoder blocks,
            DINO blocks, FeatUp's JBU stages) in place, opt-in; each compiles on its first call (tens of
            seconds on CPU, cached per shape and dtype). Stays eager, with a warning, where inductor cannot run.

    The seed's argument names `feat_backbone`, `featup_weights`, `dust3r_weights` and
    `use_mast3r_dust3r` are accepted as aliases.

    Build it from a `MEt3RConfig` with `MEt3R.from_config`, or with `MEt3R.from_pretrained(...,
    torch_dtype=, device=)`; `metric.config` holds the settings (networks passed as modules read "custom").
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
        compile: bool = False,
        **seed_aliases: Any,
    ):
        super().__init__()
        backbone, feature_backbone, backbone_weights, feature_backbone_weights = _apply_seed_aliases(
            seed_aliases, backbone, feature_backbone, backbone_weights, feature_backbone_weights
        )
        img_size = check_positive_int("img_size", img_size, optional=True)
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {tuple(REFERENCES)}, got {reference!r}")
        radius = check_finite("radius", radius, positive=True)
        points_per_pixel = check_positive_int("points_per_pixel", points_per_pixel)
        chunk_size = check_positive_int("chunk_size", chunk_size, optional=True)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
        for name, flag in (("use_norm", use_norm), ("freeze", freeze)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if upsampler not in UPSAMPLERS:  # checked even when a feature module is passed: it is recorded in config
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {compile!r}")
        settings = REFERENCES[reference]
        self.img_size = img_size
        self.symmetric = symmetric
        self.reference = reference
        self.radius = float(radius)
        self.points_per_pixel = points_per_pixel
        self.chunk_size = chunk_size
        self.guidance_image = settings["guidance"]
        self.mean_eps = settings["mean_eps"]
        self.distance_fn = get_distance(distance, settings["cosine_eps"])
        load = {"cache_dir": cache_dir, "local_files_only": local_files_only}

        self.backbone = _build_backbone(backbone, backbone_weights, load)
        self.feature_backbone = None
        if self.distance_fn.on_features:
            self.feature_backbone = _build_feature_backbone(
                feature_backbone, feature_backbone_weights, use_norm, upsampler, cache_dir
            )
        self.frozen = bool(freeze)
        if self.frozen:
            self.requires_grad_(False)
            self.eval()
        self.config = MEt3RConfig(
            img_size=img_size, use_norm=use_norm, backbone=backbone if isinstance(backbone, str) else "custom",
            feature_backbone=feature_backbone if isinstance(feature_backbone, str) else "custom",
            upsampler=upsampler, distance=distance, freeze=self.frozen, symmetric=symmetric, reference=reference,
            backbone_weights=backbone_weights, feature_backbone_weights=feature_backbone_weights, radius=self.radius,
            points_per_pixel=points_per_pixel, chunk_size=chunk_size, cache_dir=cache_dir,
            local_files_only=local_files_only, compile=compile,
        )
        if compile:
            compile_units(self)

    @property
    def distance(self) -> str:
        """Name of the distance the metric compares renderings with."""
        return self.distance_fn.name

    @classmethod
    def from_config(cls, config: MEt3RConfig, **overrides: Any) -> MEt3R:
        """Build a metric from a `MEt3RConfig`; `overrides` replace fields (e.g. `backbone=<module>`)."""
        if not isinstance(config, MEt3RConfig):
            raise TypeError(f"config must be a MEt3RConfig, got {type(config).__name__}")
        settings = {**dataclasses.asdict(config), **overrides}
        for name in ("backbone", "feature_backbone"):
            if settings[name] == "custom":
                raise ValueError(f"config.{name} is 'custom': pass the module as from_config(config, {name}=...)")
        return cls(**settings)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | None = None,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> MEt3R:
        """A metric whose geometry network loads from a hub id / local path (None: the default for `backbone`),
        moved to `device` and `torch_dtype`; other keyword arguments are `MEt3R`'s."""
        if pretrained_model_name_or_path is not None:
            if isinstance(kwargs.get("backbone"), nn.Module):
                raise ValueError(
                    "pretrained_model_name_or_path names the geometry weights, but backbone is already a module"
                )
            kwargs["backbone_weights"] = str(pretrained_model_name_or_path)
        if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
            raise ValueError(f"torch_dtype must be a floating-point torch.dtype, got {torch_dtype!r}")
        metric = cls(**kwargs)
        return metric.to(device=device, dtype=torch_dtype)

    @staticmethod
    def download_weights(
        backbone: str = "mast3r", use_norm: bool = True, cache_dir: str | None = None, revision: str | None = None
    ) -> dict[str, dict[str, str]]:
        """Fetch every file the default metric needs into the caches (for an offline machine): `hub.download_weights`."""
        return download_weights(backbone=backbone, use_norm=use_norm, cache_dir=cache_dir, revision=revision)

    @property
    def device(self) -> torch.device:
        """Device of the metric's weights (CPU for a metric without any)."""
        parameter = next(self.parameters(), None)
        return torch.device("cpu") if parameter is None else parameter.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the metric's weights (float32 for a metric without any)."""
        parameter = next(self.parameters(), None)
        return torch.float32 if parameter is None else parameter.dtype

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
        empty: str = "nan",
        min_overlap: float | None = None,
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
            empty: score of a pair without overlap: "nan" (MEt3R's reporting) or "zero" (the NaN-free
                objective for losses and guidance); `output.valid` marks the pairs that overlap either way.
            min_overlap: pairs whose `overlap_fraction` is below this are treated as pairs without overlap
                (valid=False, scored per `empty`, left out of `score`); None or 0 keeps every overlapping pair.
        """
        if empty not in functional.EMPTY_MODES:
            raise ValueError(f"empty must be one of {functional.EMPTY_MODES}, got {empty!r}")
        if min_overlap is not None and not (isinstance(min_overlap, (int, float)) and 0 <= min_overlap <= 1):
            raise ValueError(f"min_overlap must be a number in [0, 1] or None, got {min_overlap!r}")
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
                points, conf = self.compute_geometry(views, directed_local)
            else:
                points, conf = _check_geometry(geometry, batch, len(directed), images)
            features = self.compute_features(views)
            scored = self._score_rows(views, features, points, conf, directed_local, empty, return_projections)
        if not wants_grad:  # ordinary tensors for the caller (inference tensors refuse autograd and in-place edits)
            scored = {key: value.clone() for key, value in scored.items()}
        output = self._collect(scored, pair_list, empty, return_overlap_mask, return_score_map, return_projections)
        if min_overlap:  # low-overlap pairs become empty ones: same fill, same (zero) gradient, out of the mean
            output.valid = output.valid & (output.overlap_fraction >= min_overlap)
            fill = torch.full_like(output.pair_scores, math.nan if empty == "nan" else 0.0)
            output.pair_scores = torch.where(output.valid, output.pair_scores, fill)
            output.score = functional.sample_scores(output.pair_scores, output.valid, empty)
        return output

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
    def compute_geometry(
        self, images: torch.Tensor, pairs: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: point maps (B, P, 2, H, W, 3) and confidences (B, P, 2, H, W) of the pairs, in view i's frame.

        Every view is encoded once (for a shared-encoder backbone) and each pair decoded from the shared state;
        at most `chunk_size` views or (sample, pair) rows at a time. Detached, as in the reference.
        """
        batch, num_views = images.shape[:2]
        adapter = geometry_adapter(self.backbone)
        flat = images.flatten(0, 1)
        parts = [adapter.encode(flat[part]) for part in self._chunks(flat.shape[0])]
        encoded = [torch.cat(tensors).unflatten(0, (batch, num_views)) for tensors in zip(*parts)]
        sample, first, second = functional.pair_rows(batch, pairs, images.device)
        shape = tuple(images.shape[-2:])
        points, conf = [], []
        for part in self._chunks(sample.shape[0]):
            b, i, j = sample[part], first[part], second[part]
            pair_points, pair_conf = adapter.pair([t[b, i] for t in encoded], [t[b, j] for t in encoded], shape)
            points.append(pair_points)
            conf.append(pair_conf)
        size = (batch, len(pairs))
        return torch.cat(points).unflatten(0, size).float(), torch.cat(conf).unflatten(0, size).float()

    def compute_features(self, images: torch.Tensor) -> torch.Tensor:
        """Stage 2: per-pixel features of every view, channels last (B, V, H*W, C).

        Upsampled DINO features (at least float32), or the [0, 1] image for RGB distances. Channels last is the
        layout the renderer reads, made once per view.
        """
        batch, num_views, _, height, width = images.shape
        image01 = (images.flatten(0, 1) + 1) / 2
        if self.feature_backbone is None:
            return image01.flatten(2).transpose(1, 2).unflatten(0, (batch, num_views))
        adapter = feature_adapter(self.feature_backbone)
        mean = torch.tensor(IMAGENET_MEAN, dtype=image01.dtype, device=image01.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=image01.dtype, device=image01.device).view(3, 1, 1)
        normalized = (image01 - mean) / std
        guidance = normalized if self.guidance_image == "normalized" else image01
        features = None  # filled chunk by chunk (no list of chunks and concatenated copy at once)
        for part in self._chunks(normalized.shape[0]):
            high_res = adapter.features(normalized[part], guidance[part])
            if tuple(high_res.shape[-2:]) != (height, width):
                high_res = F.interpolate(high_res, (height, width), mode="bilinear", align_corners=False)
            high_res = high_res.flatten(2).transpose(1, 2)  # (n, H*W, C)
            dtype = torch.promote_types(high_res.dtype, torch.float32)  # bf16 / fp16 under autocast -> fp32
            if part.stop - part.start == batch * num_views:  # a single chunk is the table itself: no copy
                features = high_res.to(dtype).contiguous()
                break
            if features is None:
                features = high_res.new_empty(batch * num_views, *high_res.shape[1:], dtype=dtype)
            features[part] = high_res
        return features.unflatten(0, (batch, num_views))

    def _score_rows(
        self,
        images: torch.Tensor,
        features: torch.Tensor,
        points: torch.Tensor,
        conf: torch.Tensor,
        pairs: list[tuple[int, int]],
        empty: str,
        keep_projections: bool,
    ) -> dict[str, torch.Tensor]:
        """Stage 3 (`functional.score_pairs`) for every (sample, pair) row, `chunk_size` rows at a time: (B, P, ...)."""
        batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        render_size = (height, width) if self.img_size is None else (self.img_size, self.img_size)
        sample, first, second = functional.pair_rows(batch, pairs, images.device)
        points, conf = points.flatten(0, 1), conf.flatten(0, 1)  # (B*P, 2, H, W, 3), (B*P, 2, H, W)
        num_views = features.shape[1]
        feature_table = features.flatten(0, 1).float()  # (B*V, H*W, C), each cloud picks its view's row
        fields = ["score", "valid", "fraction", "mask", "score_map"] + (["projections"] if keep_projections else [])
        results: dict[str, list[torch.Tensor]] = {name: [] for name in fields}
        for part in self._chunks(sample.shape[0]):
            feature_rows = sample[part] * num_views + torch.stack([first[part], second[part]])  # (2, n)
            scored = functional.score_pairs(
                points[part], conf[part], feature_table, feature_rows, self.distance_fn, render_size,
                radius=self.radius, points_per_pixel=self.points_per_pixel, eps=self.mean_eps, empty=empty,
            )
            for name in fields:
                results[name].append(getattr(scored, name))
        return {name: torch.cat(value).unflatten(0, (batch, len(pairs))) for name, value in results.items()}

    def _collect(
        self,
        results: dict[str, torch.Tensor],
        pairs: list[tuple[int, int]],
        empty: str,
        return_overlap_mask: bool,
        return_score_map: bool,
        return_projections: bool,
    ) -> MEt3ROutput:
        """Stage 4: fold the directed results into the output (averaging both directions when symmetric)."""
        num = len(pairs)
        pair_scores, valid, fraction = results["score"][:, :num], results["valid"][:, :num], results["fraction"][:, :num]
        if self.symmetric:
            pair_scores, valid = functional.fold_symmetric(
                pair_scores, valid, results["score"][:, num:], results["valid"][:, num:], empty
            )
            fraction = (fraction + results["fraction"][:, num:]) / 2
        score = functional.sample_scores(pair_scores, valid, empty)

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
            score_map=maps("score_map", return_score_map),
            projections=maps("projections", return_projections),
            valid=valid,
        )


# ---------------------------------------------------------------------- construction helpers


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
    for key in ("pts3d", "conf"):
        value = geometry.get(key)
        if value is not None and not (
            isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_complex()
        ):
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f'geometry["{key}"] must be a real floating-point tensor, got {kind}')
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


def __getattr__(name: str) -> Any:
    if name == "MEt3REvaluator":  # 0.1 defined it here
        from .evaluation import MEt3REvaluator

        return MEt3REvaluator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
