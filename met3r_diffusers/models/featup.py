"""FeatUp "dino16": DINO ViT-S/16 features, ChannelNorm and the joint-bilateral upsampler stack (JBU).

Weight-compatible with `torch.hub.load("mhamilton723/FeatUp", "dino16", use_norm=True)` and its
checkpoint `dino16_jbu_stack_cocostuff.ckpt`; pure PyTorch (no compiled extension, no torch.hub
code at run time).

Each of the four JBU stages doubles the resolution of the features. For every output pixel it
builds a 7x7 kernel from the guidance image (a learned range kernel times a spatial Gaussian,
normalised, plus a learned fixup), and applies it to the bicubically pre-upsampled features
(one kernel per pixel, shared by all channels). That adaptive convolution is a sparse matrix
(one row per output pixel, 49 non-zeros) times the features, so it runs as a sparse-dense
matrix product and never materialises the unfolded (C*49*H*W) tensor; its backward uses the
transposed product and a sampled dense-dense product, and recomputes the pre-upsampled features
instead of storing them.
"""
from __future__ import annotations

import functools
import os
import pickle
import urllib.parse
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .dino import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE, DinoFeaturizer

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ChannelNorm", "DinoFeatUp", "JBUStack", "JBUStage"]

FEATUP_CHECKPOINT_URL = (
    "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/"
    "dino16_jbu_stack_cocostuff.ckpt"
)
# the checkpoint that hubconf picks for use_norm=False
FEATUP_NO_NORM_CHECKPOINT_URL = (
    "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/"
    "no_norm/dino16_jbu_stack_cocostuff.ckpt"
)
# DINO's own ViT-S/16 weights (what `torch.hub.load("facebookresearch/dino:main", "dino_vits16")` loads)
DINO_CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"

UPSAMPLERS = ("featup", "bilinear", "nearest", "bicubic")
FEATURE_BACKBONES = ("dino16",)
# training-only modules of FeatUp's Lightning checkpoint, dropped by the official hub loader too
_TRAINING_ONLY_KEYS = ("scale_net", "downsampler")

PathOrUrl = Union[str, os.PathLike]


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map (eps 1e-5), as FeatUp's `ChannelNorm`."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# Windowed operations as sparse products
#
# For an output grid of H x W pixels and a (2r+1)^2 window, pixel (y, x) tap p = i*(2r+1) + j
# reads pixel (y + i, x + j) of the grid padded by r on every side (Hp = H + 2r, Wp = W + 2r).
# With per-tap weights w (B, H, W, taps) this is a sparse matrix A (B*H*W x B*Hp*Wp, block
# diagonal over the batch), and with channels-last maps:
#   gather:  out = A @ padded                  out[b,y,x,:] = sum_p w[b,y,x,p] padded[b,y+i,x+j,:]
#   scatter: out = A^T @ values                (the adjoint of gather)
#   dot:     d[b,y,x,p] = <centre[b,y,x,:], padded[b,y+i,x+j,:]>   (A's pattern sampled from
#            centre @ padded^T)
# --------------------------------------------------------------------------------------------


class _Windows:
    """Sparse CSR patterns of the window matrix A and of its transpose for one grid size."""

    def __init__(self, batch: int, height: int, width: int, radius: int, device: torch.device):
        size = 2 * radius + 1
        self.batch, self.height, self.width, self.taps = batch, height, width, size * size
        self.padded_shape = (height + 2 * radius, width + 2 * radius)
        num_out, num_in = height * width, self.padded_shape[0] * self.padded_shape[1]
        index_dtype = torch.int32 if batch * max(num_in, num_out * self.taps) < 2**31 else torch.int64

        y = torch.arange(height, device=device).view(-1, 1, 1, 1)
        x = torch.arange(width, device=device).view(1, -1, 1, 1)
        offset = torch.arange(size, device=device)
        cols = ((y + offset.view(1, 1, -1, 1)) * self.padded_shape[1] + x + offset).reshape(-1)  # (H*W*taps,)
        # A^T: entries sorted by input pixel (stable, so by output pixel within a row)
        self.order = torch.argsort(cols, stable=True)
        per_input = torch.bincount(cols, minlength=num_in)

        image = torch.arange(batch, device=device).view(-1, 1)
        nnz = num_out * self.taps
        self.crow = torch.arange(0, batch * nnz + 1, self.taps, device=device, dtype=index_dtype)
        self.col = (cols + image * num_in).reshape(-1).to(index_dtype)
        crow_t = torch.zeros(batch * num_in + 1, device=device, dtype=torch.int64)
        crow_t[1:] = torch.cumsum(per_input.repeat(batch), 0)
        self.crow_t = crow_t.to(index_dtype)
        self.col_t = (self.order // self.taps + image * num_out).reshape(-1).to(index_dtype)
        self.order_t = (self.order + image * nnz).reshape(-1)
        self.shape = (batch * num_out, batch * num_in)

    def _matrix(self, weights: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        values = weights.reshape(-1)
        crow, col, shape = (self.crow_t, self.col_t, self.shape[::-1]) if transpose else (self.crow, self.col, self.shape)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            return torch.sparse_csr_tensor(crow, col, values[self.order_t] if transpose else values, size=shape,
                                           check_invariants=False)

    def gather(self, weights: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """(B, H, W, taps) x (B, Hp, Wp, C) -> (B, H, W, C)."""
        channels = padded.shape[-1]
        out = self._matrix(weights) @ padded.reshape(-1, channels)
        return out.view(self.batch, self.height, self.width, channels)

    def scatter(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, H, W, taps) x (B, H, W, C) -> (B, Hp, Wp, C), the adjoint of `gather`."""
        channels = values.shape[-1]
        out = self._matrix(weights, transpose=True) @ values.reshape(-1, channels)
        return out.view(self.batch, *self.padded_shape, channels)

    def dot(self, centre: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) x (B, Hp, Wp, C) -> (B, H, W, taps) window dot products."""
        channels = centre.shape[-1]
        pattern = self._matrix(centre.new_zeros(self.crow.shape[0] - 1, self.taps))
        sampled = torch.sparse.sampled_addmm(pattern, centre.reshape(-1, channels), padded.reshape(-1, channels).t(),
                                             beta=0.0)
        return sampled.values().view(self.batch, self.height, self.width, self.taps)


@functools.lru_cache(maxsize=8)
def _windows(batch: int, height: int, width: int, radius: int, device: torch.device) -> _Windows:
    return _Windows(batch, height, width, radius, device)




def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # the sparse kernels cover float32 and float64; reduced precision runs in float32
    return tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32


class _WindowDot(torch.autograd.Function):
    """d[b,y,x,p] = <centre[b,y,x,:], padded[b,y+i,x+j,:]> for channels-last maps."""

    @staticmethod
    def forward(ctx, centre: torch.Tensor, padded: torch.Tensor, radius: int) -> torch.Tensor:
        ctx.dtypes = (centre.dtype, padded.dtype)
        dtype = _compute_dtype(centre)
        centre, padded = centre.to(dtype).contiguous(), padded.to(dtype).contiguous()
        ctx.windows = _windows(*centre.shape[:3], radius, centre.device)
        ctx.save_for_backward(centre, padded)
        return ctx.windows.dot(centre, padded).to(ctx.dtypes[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        centre, padded = ctx.saved_tensors
        grad = grad.to(centre.dtype).contiguous()
        grad_centre = grad_padded = None
        if ctx.needs_input_grad[0]:
            grad_centre = ctx.windows.gather(grad, padded).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_padded = ctx.windows.scatter(grad, centre).to(ctx.dtypes[1])
        return grad_centre, grad_padded, None


class _AdaptiveConv(torch.autograd.Function):
    """out[b,y,x,:] = sum_p kernel[b,y,x,p] * padded[b,y+i,x+j,:] with padded = prepare(source).

    `prepare` maps `source` to the channels-last padded map (B, Hp, Wp, C). Its result is not
    stored: backward runs it again (with autograd) to get the source gradient.
    """

    @staticmethod
    def forward(ctx, source: torch.Tensor, kernel: torch.Tensor,
                prepare: Callable[[torch.Tensor], torch.Tensor], radius: int) -> torch.Tensor:
        ctx.dtypes = (source.dtype, kernel.dtype)
        dtype = _compute_dtype(kernel)
        source, kernel = source.to(dtype), kernel.to(dtype).contiguous()
        ctx.windows = _windows(*kernel.shape[:3], radius, kernel.device)
        ctx.prepare = prepare
        ctx.save_for_backward(source, kernel)
        return ctx.windows.gather(kernel, prepare(source).contiguous()).to(ctx.dtypes[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        source, kernel = ctx.saved_tensors
        grad = grad.to(kernel.dtype).contiguous()
        needs_source, needs_kernel = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            source = source.detach().requires_grad_(needs_source)
            padded = ctx.prepare(source)
        grad_source = grad_kernel = None
        if needs_kernel:
            grad_kernel = ctx.windows.dot(grad, padded.detach().contiguous()).to(ctx.dtypes[1])
        if needs_source:
            (grad_source,) = torch.autograd.grad(padded, source, ctx.windows.scatter(kernel, grad))
            grad_source = grad_source.to(ctx.dtypes[0])
        return grad_source, grad_kernel, None, None


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _adaptive_conv(padded: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """FeatUp's AdaptiveConv op: (B, C, H+2r, W+2r) x (B, H, W, 2r+1, 2r+1) -> (B, C, H, W).

    `out[b,c,y,x] = sum_{i,j} filters[b,y,x,i,j] * padded[b,c,y+i,x+j]` (cross-correlation).
    """
    batch, height, width, size, _ = filters.shape
    out = _AdaptiveConv.apply(padded, filters.reshape(batch, height, width, size * size), _channels_last,
                              (size - 1) // 2)
    return out.permute(0, 3, 1, 2)


def _upsample_and_pad(source: torch.Tensor, size: tuple[int, int], radius: int) -> torch.Tensor:
    """Bicubic resize (a = -0.75, align_corners=False) then reflect padding; channels-last result."""
    source = source.contiguous(memory_format=torch.channels_last)
    upsampled = F.interpolate(source, size=size, mode="bicubic", align_corners=False)
    return _channels_last(F.pad(upsampled, [radius] * 4, mode="reflect"))


class JBUStage(nn.Module):
    """One x2 joint-bilateral upsampling stage with a learned range kernel (FeatUp's `JBULearnedRange`).

    Parameter names follow the official module (the Sequential indices 1 and 2 are GELU and
    Dropout2d), so checkpoints load unchanged.
    """

    def __init__(self, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3):
        super().__init__()
        self.radius = radius
        taps = (2 * radius + 1) ** 2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Dropout2d(0.1), nn.Conv2d(key_dim, key_dim, 1)
        )
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(guidance_dim + taps, taps, 1), nn.GELU(), nn.Dropout2d(0.1), nn.Conv2d(taps, taps, 1)
        )
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))

    def spatial_kernel(self) -> torch.Tensor:
        """Gaussian over the window, offsets scaled to [-1, 1]: (taps,), tap p = i*(2r+1) + j."""
        coords = torch.linspace(-1, 1, 2 * self.radius + 1, device=self.sigma_spatial.device,
                                dtype=self.sigma_spatial.dtype)
        squared_distance = coords[:, None].square() + coords[None, :].square()
        return torch.exp(-squared_distance / (2 * self.sigma_spatial**2)).reshape(-1)

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """Per-pixel kernels (B, H, W, taps) from the guidance pooled to the output size (B, 3, H, W)."""
        guidance = guidance.contiguous(memory_format=torch.channels_last)
        keys = self.range_proj(guidance)  # (B, key_dim, H, W)
        padded_keys = F.pad(keys, [self.radius] * 4, mode="reflect")
        logits = _WindowDot.apply(_channels_last(keys), _channels_last(padded_keys), self.radius)
        temperature = self.range_temp.exp().clamp(1e-4, 1e4)
        kernel = torch.softmax(temperature * logits, dim=-1) * self.spatial_kernel()
        kernel = kernel / kernel.sum(-1, keepdim=True).clamp_min(1e-7)
        fixup = self.fixup_proj(torch.cat([kernel.permute(0, 3, 1, 2), guidance], dim=1))
        return kernel + 0.1 * _channels_last(fixup)

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features, (B, 3, H, W) pooled guidance -> (B, C, H, W) features (channels-last memory)."""
        size = tuple(guidance.shape[-2:])
        prepare = functools.partial(_upsample_and_pad, size=size, radius=self.radius)
        out = _AdaptiveConv.apply(source, self.kernel(guidance), prepare, self.radius)
        return out.permute(0, 3, 1, 2)


class JBUStack(nn.Module):
    """Four x2 JBU stages (guidance average-pooled to each stage's size) and a residual 1x1 fixup."""

    def __init__(self, dim: int = 384):
        super().__init__()
        self.up1, self.up2, self.up3, self.up4 = (JBUStage() for _ in range(4))
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(dim, dim, 1))

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features, (B, 3, H, W) guidance image -> (B, C, 16h, 16w) features."""
        for stage in (self.up1, self.up2, self.up3, self.up4):
            height, width = source.shape[-2:]
            source = stage(source, F.adaptive_avg_pool2d(guidance, (2 * height, 2 * width)))
        return torch.add(source, self.fixup_proj(source), alpha=0.1)


def _key_list(keys: list[str], limit: int = 10) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _read_checkpoint(path_or_url: PathOrUrl, cache_dir: Optional[PathOrUrl], what: str) -> dict[str, torch.Tensor]:
    """State dict from a local file (.ckpt / .pth / .safetensors) or a URL (downloaded once by torch.hub)."""
    location = os.fspath(path_or_url)
    try:
        if location.startswith(("http://", "https://")):
            model_dir = os.fspath(cache_dir) if cache_dir is not None else os.path.join(torch.hub.get_dir(), "checkpoints")
            target = os.path.join(model_dir, os.path.basename(urllib.parse.urlparse(location).path))
            try:
                checkpoint = torch.hub.load_state_dict_from_url(location, model_dir=model_dir, map_location="cpu",
                                                                weights_only=True)
            except OSError as err:  # no network (URLError), HTTP errors, unwritable cache
                raise FileNotFoundError(
                    f"the {what} checkpoint is not cached and could not be downloaded from {location} ({err}). "
                    f"Download it on a machine with network access and put it at {target}, or pass its local path."
                ) from err
        else:
            path = Path(location)
            if not path.is_file():
                raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{location}: cannot read this {what} checkpoint safely (weights_only=True): {err}") from err
    # Lightning checkpoints (FeatUp's) keep the weights under "state_dict"
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{location}: expected a state dict (or a Lightning checkpoint holding one)")
    return checkpoint


class DinoFeatUp(nn.Module):
    """DINO ViT-S/16 features (+ ChannelNorm) upsampled to image resolution by FeatUp's JBU stack.

    Args:
        feature_backbone: "dino16" (DINO ViT-S/16, the only backbone MEt3R uses).
        use_norm: apply FeatUp's ChannelNorm to the low-resolution features (FeatUp's default checkpoint).
        upsampler: "featup" (learned JBU stack) or a weight-free interpolation of the low-resolution
            features to the guidance size: "bilinear", "nearest", "bicubic".

    State-dict names are the official ones: `model.0.model.*` (DINO; `model.model.*` without
    ChannelNorm), `model.1.norm.*` (ChannelNorm), `upsampler.*` (JBU stack).
    """

    def __init__(self, feature_backbone: str = "dino16", use_norm: bool = True, upsampler: str = "featup"):
        super().__init__()
        if feature_backbone not in FEATURE_BACKBONES:
            raise ValueError(f"feature_backbone must be one of {FEATURE_BACKBONES}, got {feature_backbone!r}")
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if not isinstance(use_norm, bool):
            raise ValueError(f"use_norm must be a bool, got {use_norm!r}")
        self.feature_backbone, self.use_norm, self.upsampler_type = feature_backbone, use_norm, upsampler
        featurizer = DinoFeaturizer()
        self.dim = featurizer.dim
        self.model = nn.Sequential(featurizer, ChannelNorm(self.dim)) if use_norm else featurizer
        self.upsampler = JBUStack(self.dim) if upsampler == "featup" else None

    def low_res(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, 384, H/16, W/16) features (after ChannelNorm if use_norm)."""
        return self.model(images)

    def upsample(self, low_res: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """(B, 384, h, w) features guided by a (B, 3, H, W) image -> (B, 384, H, W) features.

        FeatUp's stack yields (16h, 16w); a different guidance size is reached by a bilinear
        resize (as MEt3R does). Without a learned upsampler the features are interpolated.
        """
        if low_res.ndim != 4 or low_res.shape[1] != self.dim:
            raise ValueError(f"low_res must have shape (B, {self.dim}, h, w), got {tuple(low_res.shape)}")
        if guidance.ndim != 4 or guidance.shape[1] != 3 or guidance.shape[0] != low_res.shape[0]:
            raise ValueError(f"guidance must have shape ({low_res.shape[0]}, 3, H, W), got {tuple(guidance.shape)}")
        size = tuple(guidance.shape[-2:])
        if self.upsampler is None:
            corners = {} if self.upsampler_type == "nearest" else {"align_corners": False}
            return F.interpolate(low_res, size=size, mode=self.upsampler_type, **corners)
        if min(low_res.shape[-2:]) < 2:
            raise ValueError(f"low_res: the JBU stack needs at least 2x2 features (images of at least "
                             f"{2 * PATCH_SIZE}x{2 * PATCH_SIZE}), got {tuple(low_res.shape[-2:])}")
        features = self.upsampler(low_res, guidance)
        if tuple(features.shape[-2:]) != size:
            features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Upsampled features of ImageNet-normalised images, guided by the same normalised images."""
        return self.upsample(self.low_res(images), images)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load official FeatUp names. Training-only keys (`scale_net`, `downsampler`) are dropped, and
        `upsampler.*` when this model has no learned upsampler. With `strict`, any other missing or
        unexpected key raises a ValueError naming them, before anything is loaded."""
        keep = {
            k: v for k, v in state_dict.items()
            if not any(name in k for name in _TRAINING_ONLY_KEYS)
            and not (self.upsampler is None and k.startswith("upsampler."))
        }
        if strict:
            expected = set(self.state_dict())
            missing, unexpected = sorted(expected - keep.keys()), sorted(keep.keys() - expected)
            problems = [f"{len(missing)} missing keys: {_key_list(missing)}"] if missing else []
            problems += [f"{len(unexpected)} unexpected keys: {_key_list(unexpected)}"] if unexpected else []
            if problems:
                raise ValueError("state dict does not fit DinoFeatUp: " + "; ".join(problems))
        return super().load_state_dict(keep, strict=strict, assign=assign)

    @classmethod
    def from_pretrained(cls, path_or_url: Optional[PathOrUrl] = None, cache_dir: Optional[PathOrUrl] = None, *,
                        use_norm: bool = True, upsampler: str = "featup",
                        dino_path_or_url: Optional[PathOrUrl] = None) -> "DinoFeatUp":
        """Model with the official FeatUp `dino16` weights (downloaded once), in eval mode.

        Args:
            path_or_url: local checkpoint (Lightning `.ckpt` with "state_dict", plain state dict
                `.pth`, or `.safetensors`) or URL; default: FeatUp's `dino16_jbu_stack_cocostuff.ckpt`
                (the `no_norm/` variant when `use_norm=False`).
            cache_dir: download directory (torch.hub's `model_dir`); default `<torch hub dir>/checkpoints`.
            dino_path_or_url: DINO ViT-S/16 weights used only when the FeatUp checkpoint carries no
                backbone weights; default: DINO's `dino_deitsmall16_pretrain.pth`.
        """
        model = cls(use_norm=use_norm, upsampler=upsampler)
        if path_or_url is None:
            path_or_url = FEATUP_CHECKPOINT_URL if use_norm else FEATUP_NO_NORM_CHECKPOINT_URL
        state_dict = _read_checkpoint(path_or_url, cache_dir, "FeatUp")
        dino_prefix = "model.0.model." if use_norm else "model.model."
        if not any(k.startswith(dino_prefix) for k in state_dict):
            # the official hub model keeps the DINO weights it fetched itself for keys the checkpoint lacks
            dino = _read_checkpoint(dino_path_or_url or DINO_CHECKPOINT_URL, cache_dir, "DINO ViT-S/16")
            state_dict = {**state_dict, **{dino_prefix + k: v for k, v in dino.items()}}
        model.load_state_dict(state_dict)
        return model.eval()
