"""FeatUp "dino16": DINO ViT-S/16 features, ChannelNorm and the joint-bilateral upsampler stack (JBU).

Weight-compatible with `torch.hub.load("mhamilton723/FeatUp", "dino16", use_norm=True)` and its
checkpoint `dino16_jbu_stack_cocostuff.ckpt`; pure PyTorch (no compiled extension, no torch.hub
code at run time).

Each of the four JBU stages doubles the resolution of the features. For every output pixel it
builds a 7x7 kernel from the guidance image (a learned range kernel times a spatial Gaussian,
normalised, plus a learned fixup), and applies it to the bicubically pre-upsampled, reflect-padded
features (one kernel per pixel, shared by all channels). That adaptive convolution is a sparse
matrix (one row per output pixel, 49 taps) times the features. Resize, padding and window are all
linear and fixed, so the forward folds them into one 49-tap matrix over the *source* map and runs
it as a weighted gather (`embedding_bag`): neither the pre-upsampled map nor the unfolded
(C*49*H*W) tensor is built. The backward runs the same matrix: its transpose (again a weighted
gather) for the features' gradient, and a sampled dense-dense product, taken back through the
fold, for the kernels' gradient.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from typing import ClassVar, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import hub
from .dino import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE, DinoFeaturizer

logger = logging.getLogger(__name__)

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
# The two URLs end in the same file name, which torch hub would cache under one name; each variant
# gets its own cache file so that one can never be taken for the other.
FEATUP_CACHE_FILE_NAMES = {True: "dino16_jbu_stack_cocostuff-use_norm.ckpt",
                           False: "dino16_jbu_stack_cocostuff-no_norm.ckpt"}
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
# The JBU's spatial operations as sparse matrices
#
# Maps are flattened channels-last, one row per pixel: (B*H*W, C). A "tap matrix" A has, for
# every output pixel r, a fixed list of input pixels index[r, p] (p = 0..taps-1) with per-call
# weights w[r, p] (per image of the batch). Then
#   A @ x            out[r] = sum_p w[r, p] x[index[r, p]]
#   A^T @ y          its adjoint (the gradient of the former w.r.t. x)
#   sampled dot      d[r, p] = <y[r], x[index[r, p]]>   (the gradient w.r.t. w; also the range logits)
# Three appear: the 7x7 window of every pixel, reflected at the borders as FeatUp's reflect padding
# does (the range logits); the same window over an already padded grid (FeatUp's AdaptiveConv op);
# and bicubic resizing + padding + window folded into one 49-tap matrix from the source map
# (`_resized_window_matrix`, the JBU stages).
# --------------------------------------------------------------------------------------------


def _offsets(counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """CSR row offsets from per-row entry counts."""
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(dtype)


class _TapMatrix:
    """A for one image as its tap list: row r reads input rows index[r, p], p = 0..taps-1.

    Both products are weighted gathers (`embedding_bag(mode="sum")` with per-sample weights, whose
    fused kernel beat the CSR products of `torch.sparse` by 30-45 % here): A @ x over each row's taps,
    A^T @ y over each input row's (output row, tap) list. The sampled dot uses A's canonical CSR
    pattern (columns sorted, taps of a row that hit one pixel merged). Derived tables are built on
    first use.
    """

    def __init__(self, index: torch.Tensor, num_in: int):
        num_out, self.taps = index.shape
        self.index = index.to(torch.int32 if num_in < 2**31 else torch.int64).contiguous()  # embedding_bag takes both
        self.shape = (num_out, num_in)
        self._batched_index: tuple[int, torch.Tensor] | None = None  # the last batch size > 1 and its index

    @functools.cached_property
    def _transpose_bags(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, rows, offsets): the (row, tap) entries sorted by input row; entries offsets[s]:offsets[s+1]
        of input row s are taps `order` of output rows `rows`."""
        flat = self.index.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        dtype = self.index.dtype if flat.numel() < 2**31 else torch.int64
        offsets = _offsets(torch.bincount(flat, minlength=self.shape[1]), dtype)
        return order, (order // self.taps).to(dtype), offsets

    @functools.cached_property
    def _canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(crow, col, slot): A in CSR form and the merged entry of each (row, tap); slot None when every
        tap is its own entry in increasing order."""
        num_out, num_in = self.shape
        rows = torch.arange(num_out, device=self.index.device).repeat_interleave(self.taps)
        entries, slot = torch.unique(rows * num_in + self.index.reshape(-1).long(), return_inverse=True)  # sorted
        row, col = entries // num_in, entries % num_in
        dtype = torch.int32 if entries.numel() < 2**31 else torch.int64
        identity = torch.equal(slot, torch.arange(slot.numel(), device=slot.device))
        return _offsets(torch.bincount(row, minlength=num_out), dtype), col.to(dtype), None if identity else slot

    def gather(self, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """A @ dense for per-(row, tap) `weights` (B, num_out, taps); dense (B, num_in, C) -> (B, num_out, C)."""
        batch, _, channels = dense.shape
        index = self.index
        if batch > 1:  # the taps of image b read rows b * num_in + index; one batch size is kept
            if self._batched_index is None or self._batched_index[0] != batch:
                dtype = torch.int32 if batch * self.shape[1] < 2**31 else torch.int64
                shift = torch.arange(batch, device=index.device)[:, None, None] * self.shape[1]
                self._batched_index = batch, (index + shift).reshape(-1, self.taps).to(dtype)
            index = self._batched_index[1]
        # a strided table (a permuted NCHW map) would make every gathered row a strided read
        out = F.embedding_bag(index, dense.reshape(-1, channels).contiguous(),
                              per_sample_weights=weights.reshape(-1, self.taps), mode="sum")
        return out.view(batch, self.shape[0], channels)

    def transpose_gather(self, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """A^T @ dense for per-(row, tap) `weights` (B, num_out, taps); dense (B, num_out, C) -> (B, num_in, C)."""
        order, rows, offsets = self._transpose_bags
        out = dense.new_empty(dense.shape[0], self.shape[1], dense.shape[-1])
        for image_weights, image_dense, image_out in zip(weights.reshape(weights.shape[0], -1), dense, out):
            image_out.copy_(F.embedding_bag(rows, image_dense.contiguous(), offsets, mode="sum",
                                            per_sample_weights=image_weights[order], include_last_offset=True))
        return out

    def sampled_dot(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """d[b, r, p] = <left[b, r], right[b, index[r, p]]>: (B, num_out * taps); left (B, num_out, C), right (B, num_in, C)."""
        crow, col, slot = self._canonical
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            pattern = torch.sparse_csr_tensor(crow, col, left.new_zeros(col.shape[0]), size=self.shape,
                                              check_invariants=False)
        dots = [torch.sparse.sampled_addmm(pattern, image_left, image_right.t(), beta=0.0).values()
                for image_left, image_right in zip(left, right)]
        return torch.stack(dots if slot is None else [image_dots.index_select(0, slot) for image_dots in dots])


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect out-of-range indices at the borders (no repeated edge), as reflect padding does."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


@functools.lru_cache(maxsize=16)
def _window_matrix(height: int, width: int, radius: int, padded: bool, device: torch.device) -> _TapMatrix:
    """Tap p = i*(2r+1) + j of pixel (y, x) reads (y+i-r, x+j-r), reflected at the borders; or,
    when `padded`, pixel (y+i, x+j) of an input already padded by r on every side."""
    offsets = torch.arange(-radius, radius + 1, device=device)
    rows = torch.arange(height, device=device)[:, None] + offsets
    cols = torch.arange(width, device=device)[:, None] + offsets
    if padded:
        rows, cols, in_width = rows + radius, cols + radius, width + 2 * radius
        num_in = (height + 2 * radius) * in_width
    else:
        rows, cols, in_width, num_in = _reflect(rows, height), _reflect(cols, width), width, height * width
    index = rows[:, None, :, None] * in_width + cols[None, :, None, :]  # (H, W, 2r+1, 2r+1)
    return _TapMatrix(index.reshape(height * width, -1), num_in)


def _cubic_taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights (out_size, 4) of bicubic resizing along one axis, as `F.interpolate`
    with a size: align_corners=False, a = -0.75. Indices are not clamped: the resize reads
    `source[clamp(index, 0, in_size - 1)]`."""
    a = -0.75
    source = (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5
    first = source.floor()
    t = (source - first)[:, None]
    index = first.long()[:, None] + torch.arange(-1, 3, device=device)
    distance = torch.cat([t + 1, t, 1 - t, 2 - t], dim=1)
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    return index, torch.where(distance <= 1, near, far)


def _windowed_cubic(in_size: int, out_size: int, radius: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bicubic resizing along one axis followed by the reflected window of every output coordinate,
    as one map: (out_size, span) source indices (clamped) and (out_size, 2r+1, span) float64 weights,
    window tap i of output y being sum_a weights[y, i, a] * source[index[y, a]].

    For a x2 upsampling the window's 2r+1 resized coordinates (reflected, so within r of y) read
    r + 4 source coordinates: 7 for FeatUp's r = 3, as many as the window has taps.
    """
    raw, weights = _cubic_taps(in_size, out_size, device)  # (out, 4)
    window = _reflect(torch.arange(out_size, device=device)[:, None] + torch.arange(-radius, radius + 1, device=device),
                      out_size)  # (out, 2r+1)
    raw, weights = raw[window], weights[window]  # (out, 2r+1, 4)
    first = raw.amin(dim=(1, 2))
    span = int((raw.amax(dim=(1, 2)) - first).max()) + 1
    composed = weights.new_zeros(out_size, 2 * radius + 1, span).scatter_add_(2, raw - first[:, None, None], weights)
    index = (first[:, None] + torch.arange(span, device=device)).clamp(0, in_size - 1)
    return index, composed


@functools.lru_cache(maxsize=8)
def _resized_window_matrix(in_size: tuple[int, int], out_size: tuple[int, int], radius: int,
                           device: torch.device) -> tuple[_TapMatrix, torch.Tensor, torch.Tensor]:
    """The bicubic resize + reflect padding + (2r+1)^2 window of FeatUp's stages folded into one
    tap matrix from the source grid: (its matrix, row weights (H, 2r+1, span_y), column weights
    (W, 2r+1, span_x)); a pixel's per-tap weights are its window kernel contracted with both.

    Tap order is (column slot, row slot), matching `_fold_resize`.
    """
    cpu = torch.device("cpu")  # small tables: no device round trips while building them
    rows, row_weights = _windowed_cubic(in_size[0], out_size[0], radius, cpu)
    cols, col_weights = _windowed_cubic(in_size[1], out_size[1], radius, cpu)
    index = rows[:, None, None, :] * in_size[1] + cols[None, :, :, None]  # (H, W, span_x, span_y)
    matrix = _TapMatrix(index.reshape(out_size[0] * out_size[1], -1).to(device), in_size[0] * in_size[1])
    return matrix, row_weights.to(device), col_weights.to(device)


def _fold_resize(kernel: torch.Tensor, row_weights: torch.Tensor, col_weights: torch.Tensor) -> torch.Tensor:
    """Window kernels (B, H, W, (2r+1)^2) -> kernels over the source taps of `_resized_window_matrix`,
    (B, H, W, span_x * span_y): k'[b,y,x,c,a] = sum_{i,j} kernel[b,y,x,i,j] rows[y,i,a] cols[x,j,c]."""
    batch, height, width, _ = kernel.shape
    size = row_weights.shape[1]
    kernel = kernel.view(batch, height, width, size, size)
    by_rows = torch.einsum("bhwij,hia->bhwja", kernel, row_weights.to(kernel.dtype))
    return torch.einsum("bhwja,wjc->bhwca", by_rows, col_weights.to(kernel.dtype)).reshape(batch, height, width, -1)


def _unfold_resize(grad: torch.Tensor, row_weights: torch.Tensor, col_weights: torch.Tensor) -> torch.Tensor:
    """The adjoint of `_fold_resize`: gradients (B, H, W, span_x * span_y) of the folded kernels -> (B, H, W, (2r+1)^2)."""
    batch, height, width, _ = grad.shape
    size, span_y, span_x = row_weights.shape[1], row_weights.shape[2], col_weights.shape[2]
    grad = grad.view(batch, height, width, span_x, span_y)
    by_cols = torch.einsum("bhwca,wjc->bhwja", grad, col_weights.to(grad.dtype))
    return torch.einsum("bhwja,hia->bhwij", by_cols, row_weights.to(grad.dtype)).reshape(batch, height, width, size * size)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # the sparse kernels cover float32 and float64; reduced precision runs in float32
    return tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class _WindowDot(torch.autograd.Function):
    """logits[b,y,x,p] = <keys[b,y,x,:], keys[b,y',x',:]> over the reflected window (y', x') of each pixel."""

    @staticmethod
    def forward(ctx, keys: torch.Tensor, radius: int) -> torch.Tensor:
        ctx.dtype = keys.dtype
        keys = keys.to(_compute_dtype(keys)).contiguous()
        batch, height, width, channels = keys.shape
        ctx.matrix = _window_matrix(height, width, radius, False, keys.device)
        ctx.save_for_backward(keys)
        flat = keys.view(batch, -1, channels)
        return ctx.matrix.sampled_dot(flat, flat).view(batch, height, width, -1).to(ctx.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (keys,) = ctx.saved_tensors
        flat = keys.view(keys.shape[0], -1, keys.shape[-1])
        grad = grad.to(keys.dtype).reshape(keys.shape[0], -1, ctx.matrix.taps)
        # keys appear on both sides of the dot product: as centres and as window pixels
        grad_keys = ctx.matrix.gather(grad, flat) + ctx.matrix.transpose_gather(grad, flat)
        return grad_keys.view(keys.shape).to(ctx.dtype), None


class _AdaptiveConv(torch.autograd.Function):
    """out[b,y,x,:] = sum_p kernel[b,y,x,p] * source'[b, window_p(y, x), :], channels-last (B, H, W, C).

    With `resize`, source' is `source` (B, C, h, w) bicubically resized to the kernel's (H, W) and
    reflect-padded by the radius (FeatUp's pre-upsampling and padding); without, `source` is already
    padded. source' is never built: resize, padding and window fold into one tap matrix over the
    source grid (`_resized_window_matrix`), whose per-pixel weights are the kernels contracted with
    the separable resize weights (`_fold_resize`). The backward runs the same matrix: its transpose
    for the source's gradient, the sampled dot for the folded weights' gradient, and the fold's
    adjoint (`_unfold_resize`) to bring that back to the kernels.
    """

    @staticmethod
    def _operator(source_size: tuple[int, int], size: tuple[int, int], radius: int, resize: bool,
                  device: torch.device) -> tuple[_TapMatrix, tuple[torch.Tensor, torch.Tensor] | None]:
        """The tap matrix from the source grid and, with `resize`, the fold's row and column weights."""
        if not resize:
            return _window_matrix(*size, radius, True, device), None
        matrix, row_weights, col_weights = _resized_window_matrix(source_size, size, radius, device)
        return matrix, (row_weights, col_weights)

    @staticmethod
    def forward(ctx, source: torch.Tensor, kernel: torch.Tensor, radius: int, resize: bool) -> torch.Tensor:
        ctx.dtypes = (source.dtype, kernel.dtype)
        dtype = _compute_dtype(kernel)
        source, kernel = source.to(dtype), kernel.to(dtype).contiguous()
        batch, height, width, _ = kernel.shape
        ctx.radius, ctx.resize = radius, resize
        ctx.save_for_backward(source, kernel)
        matrix, fold = _AdaptiveConv._operator(tuple(source.shape[-2:]), (height, width), radius, resize, kernel.device)
        flat = _channels_last(source).reshape(batch, -1, source.shape[1])
        with torch.autocast(kernel.device.type, enabled=False):  # the fold's einsums stay in the compute dtype
            out = matrix.gather(kernel if fold is None else _fold_resize(kernel, *fold), flat)
        return out.view(batch, height, width, -1).to(ctx.dtypes[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        source, kernel = ctx.saved_tensors
        batch, channels, source_height, source_width = source.shape
        matrix, fold = _AdaptiveConv._operator((source_height, source_width), tuple(kernel.shape[1:3]), ctx.radius,
                                               ctx.resize, kernel.device)
        grad = grad.to(kernel.dtype).reshape(batch, -1, channels)
        grad_source = grad_kernel = None
        with torch.autocast(kernel.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                flat = _channels_last(source).reshape(batch, -1, channels)
                dots = matrix.sampled_dot(grad, flat).view(*kernel.shape[:3], -1)
                grad_kernel = (dots if fold is None else _unfold_resize(dots, *fold)).to(ctx.dtypes[1])
            if ctx.needs_input_grad[0]:
                weights = kernel if fold is None else _fold_resize(kernel, *fold)
                grad_input = matrix.transpose_gather(weights, grad)
                grad_source = grad_input.view(batch, source_height, source_width, channels).permute(0, 3, 1, 2)
                grad_source = grad_source.to(ctx.dtypes[0])
        return grad_source, grad_kernel, None, None


def _adaptive_conv(padded: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """FeatUp's AdaptiveConv op: (B, C, H+2r, W+2r) x (B, H, W, 2r+1, 2r+1) -> (B, C, H, W).

    `out[b,c,y,x] = sum_{i,j} filters[b,y,x,i,j] * padded[b,c,y+i,x+j]` (cross-correlation).
    """
    batch, height, width, size, _ = filters.shape
    out = _AdaptiveConv.apply(padded, filters.reshape(batch, height, width, size * size), (size - 1) // 2, False)
    return out.permute(0, 3, 1, 2)


def _pointwise_mlp(layers: nn.Sequential, x: torch.Tensor, first_done: bool = False) -> torch.Tensor:
    """FeatUp's (1x1 conv, GELU, Dropout2d, 1x1 conv) on channels-last maps (B, H, W, C).

    With `first_done`, `x` is already the first convolution's output. Dropout2d (training only)
    drops whole channels, as on the (B, C, H, W) map.
    """
    first, activation, dropout, second = layers
    if not first_done:
        x = F.linear(x, first.weight.flatten(1), first.bias)
    x = dropout(activation(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return F.linear(x, second.weight.flatten(1), second.bias)


def _window_logits(keys: torch.Tensor, radius: int) -> torch.Tensor:
    """<keys[b,y,x], keys[b,y',x']> over the reflected window of every pixel: (B, H, W, taps).

    Eager: the sparse sampled product of `_WindowDot`. Inside a compiled graph: a dense sum over
    the shifted reflect-padded map, which the compiler fuses into one pass (no taps x channels
    x pixels tensor either way).
    """
    if not torch.compiler.is_compiling():
        return _WindowDot.apply(keys, radius)
    height, width, size = keys.shape[1], keys.shape[2], 2 * radius + 1
    padded = _channels_last(F.pad(keys.permute(0, 3, 1, 2), [radius] * 4, mode="reflect"))
    return torch.stack([(keys * padded[:, i:i + height, j:j + width]).sum(-1)
                        for i in range(size) for j in range(size)], dim=-1)


@torch.compiler.disable
def _resized_adaptive_conv(source: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """`_AdaptiveConv` with FeatUp's bicubic pre-upsampling: (B, C, h, w) x (B, H, W, taps) -> (B, H, W, C).

    Always eager: its sparse products beat the compiled dense form (measured in docs/features.md).
    """
    return _AdaptiveConv.apply(source, kernel, radius, True)


# pixels per band of `JBUStage.kernel` in eval mode: each of its ~10 temporaries is then ~3 MB
_KERNEL_BAND_PIXELS = 16384


class JBUStage(nn.Module):
    """One x2 joint-bilateral upsampling stage with a learned range kernel (FeatUp's `JBULearnedRange`).

    Parameter names follow the official module (the Sequential indices 1 and 2 are GELU and
    Dropout2d), so checkpoints load unchanged.
    """

    compile_unit: ClassVar[bool] = True  # the kernel construction; the adaptive convolution stays eager

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
        """Per-pixel kernels (B, H, W, taps) from the guidance pooled to the output size (B, 3, H, W).

        The 1x1 convolutions run as matrix products over channels-last pixels (mkldnn is slow with
        3 to 52 channels). In eval mode the per-pixel part runs a band of rows at a time, so that its
        temporaries stay in cache (training keeps one pass: Dropout2d draws one mask per map).
        """
        guidance = _channels_last(guidance).contiguous()  # strided operands make MKL's rounding vary
        keys = _pointwise_mlp(self.range_proj, guidance)  # (B, H, W, key_dim), contiguous
        logits = _window_logits(keys, self.radius)
        if self.training or torch.compiler.is_compiling():
            return self._kernel_from_logits(logits, guidance)
        rows = max(1, _KERNEL_BAND_PIXELS // (guidance.shape[0] * guidance.shape[2]))
        bands = zip(logits.split(rows, dim=1), guidance.split(rows, dim=1))
        return torch.cat([self._kernel_from_logits(*band) for band in bands], dim=1)

    def _kernel_from_logits(self, logits: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Range softmax x spatial Gaussian, normalised, plus the learned fixup: (..., taps) per pixel.

        The fixup's first layer is split into its kernel and guidance columns, so the concatenated
        (taps + 3)-channel map is never built.
        """
        temperature = self.range_temp.exp().clamp(1e-4, 1e4)
        kernel = torch.softmax(temperature * logits, dim=-1) * self.spatial_kernel()
        kernel = kernel / kernel.sum(-1, keepdim=True).clamp_min(1e-7)
        taps = kernel.shape[-1]
        first = self.fixup_proj[0]
        weight = first.weight.flatten(1)
        # contiguous column blocks: MKL's results then do not depend on where the weight is stored
        hidden = (F.linear(kernel, weight[:, :taps].contiguous(), first.bias)
                  + F.linear(guidance, weight[:, taps:].contiguous()))
        return kernel + 0.1 * _pointwise_mlp(self.fixup_proj, hidden, first_done=True)

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features, (B, 3, H, W) pooled guidance -> (B, C, H, W) features (channels-last memory)."""
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # the kernel's intermediate maps are recomputed in backward rather than stored (a compiled
            # graph makes that choice itself)
            kernel = checkpoint(self.kernel, guidance, use_reentrant=False)
        else:
            kernel = self.kernel(guidance)
        return _resized_adaptive_conv(source, kernel, self.radius).permute(0, 3, 1, 2)


class JBUStack(nn.Module):
    """Four x2 JBU stages (guidance average-pooled to each stage's size) and a residual 1x1 fixup."""

    def __init__(self, dim: int = 384):
        super().__init__()
        self.up1, self.up2, self.up3, self.up4 = (JBUStage() for _ in range(4))
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(dim, dim, 1))

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features, (B, 3, H, W) guidance image -> (B, C, 16h, 16w) features."""
        dropout, conv = self.fixup_proj
        weight, bias = conv.weight.flatten(1), conv.bias
        if not self.training:
            # The fixup x + 0.1 * conv1x1(x) = (I + 0.1 W) x + 0.1 b mixes channels only, and every
            # stage mixes pixels only, linearly (its kernel depends on the guidance alone), so the
            # matrix (I + 0.1 W) is applied first, at the lowest resolution (1/256 of the pixels).
            identity = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
            source = F.linear(_channels_last(source), identity + 0.1 * weight).permute(0, 3, 1, 2)
        for stage in (self.up1, self.up2, self.up3, self.up4):
            height, width = source.shape[-2:]
            source = stage(source, F.adaptive_avg_pool2d(guidance, (2 * height, 2 * width)))
        if not self.training:
            bias = (0.1 * bias).to(source.dtype)[:, None, None]
            if torch.is_grad_enabled() and (source.requires_grad or bias.requires_grad):
                return source + bias
            return source.add_(bias)  # in place: no second full-size map
        # Dropout2d is active and applies to the fixup branch only; the 1x1 convolution runs as a
        # matmul over channels-last pixels (with frozen weights it keeps no copy of its input)
        fixup = F.linear(_channels_last(dropout(source)), weight, bias)
        return fixup.mul_(0.1).add_(_channels_last(source)).permute(0, 3, 1, 2)


def _key_list(keys: list[str], limit: int = 10) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def featup_checkpoint(use_norm: bool) -> tuple[str, str]:
    """(URL, cache file name) of FeatUp's dino16 checkpoint with (use_norm=True) or without ChannelNorm."""
    return (FEATUP_CHECKPOINT_URL if use_norm else FEATUP_NO_NORM_CHECKPOINT_URL), FEATUP_CACHE_FILE_NAMES[use_norm]


def _read_checkpoint(path_or_url: PathOrUrl, cache_dir: PathOrUrl | None, what: str,
                     file_name: str | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """(state dict, local file) from a local .ckpt / .pth / .safetensors or a URL (downloaded once)."""
    location = os.fspath(path_or_url)
    if location.startswith(("http://", "https://")):
        path = hub.cached_download(location, file_name, cache_dir, what)
    else:
        path = Path(location).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), path
        except Exception as err:  # safetensors' own error type: truncated or corrupt
            raise ValueError(f"{path}: cannot read this {what} safetensors file (truncated or corrupt?): {err}") from err
    checkpoint = hub.load_torch_file(path)
    # Lightning checkpoints (FeatUp's) keep the weights under "state_dict"
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path}: expected a {what} state dict (or a Lightning checkpoint holding one)")
    return checkpoint, path


def _check_featup_variant(state_dict: dict[str, torch.Tensor], use_norm: bool, path: Path) -> None:
    """Refuse files that are not FeatUp dino16 checkpoints, or that are the other use_norm variant."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state_dict)

    if not (has("upsampler.") or has("model.0.model.") or has("model.model.")):
        raise ValueError(f"{path}: not a FeatUp dino16 checkpoint (no upsampler.* or DINO model.* keys; "
                         f"it holds {_key_list(sorted(state_dict), 5)})")
    with_norm, without_norm = has("model.0.model.") or has("model.1.norm."), has("model.model.")
    if (use_norm and without_norm) or (not use_norm and with_norm):
        raise ValueError(
            f"{path}: this is FeatUp's use_norm={not use_norm} checkpoint (its backbone / ChannelNorm keys say so), "
            f"but use_norm={use_norm} was asked. Delete it if it is a wrongly cached file; the use_norm={use_norm} "
            f"file is {featup_checkpoint(use_norm)[0]}, cached as {FEATUP_CACHE_FILE_NAMES[use_norm]}."
        )


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
            raise TypeError(f"use_norm must be a bool, got {use_norm!r}")
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
    def from_pretrained(cls, path_or_url: PathOrUrl | None = None, cache_dir: PathOrUrl | None = None, *,
                        use_norm: bool = True, upsampler: str = "featup",
                        dino_path_or_url: PathOrUrl | None = None) -> DinoFeatUp:
        """Model with the official FeatUp `dino16` weights (downloaded once), in eval mode.

        Args:
            path_or_url: local checkpoint (Lightning `.ckpt` with "state_dict", plain state dict
                `.pth`, or `.safetensors`) or URL; default: FeatUp's `dino16_jbu_stack_cocostuff.ckpt`
                (the `no_norm/` variant when `use_norm=False`), cached under a per-variant name
                (`FEATUP_CACHE_FILE_NAMES`).
            cache_dir: download directory (torch.hub's `model_dir`); default `<torch hub dir>/checkpoints`.
            dino_path_or_url: DINO ViT-S/16 weights used only when the FeatUp checkpoint carries no
                backbone weights; default: DINO's `dino_deitsmall16_pretrain.pth`.

        A checkpoint without `model.1.norm.*` keeps ChannelNorm at its defaults (weight 1, bias 0), as
        the original's non-strict load does. Files that are not FeatUp checkpoints, or the other
        `use_norm` variant, raise a ValueError naming the file.
        """
        model = cls(use_norm=use_norm, upsampler=upsampler)
        if path_or_url is None:
            path_or_url = featup_checkpoint(use_norm)[0]
        # either published URL, however given, is cached under its own variant's name
        file_name = {featup_checkpoint(flag)[0]: featup_checkpoint(flag)[1] for flag in (True, False)}.get(
            os.fspath(path_or_url))
        state_dict, path = _read_checkpoint(path_or_url, cache_dir, "FeatUp", file_name)
        _check_featup_variant(state_dict, use_norm, path)
        source = str(path)
        dino_prefix = "model.0.model." if use_norm else "model.model."
        if not any(k.startswith(dino_prefix) for k in state_dict):
            # the official hub model keeps the DINO weights it fetched itself for keys the checkpoint lacks
            dino, dino_path = _read_checkpoint(dino_path_or_url or DINO_CHECKPOINT_URL, cache_dir, "DINO ViT-S/16")
            state_dict = {**state_dict, **{dino_prefix + k: v for k, v in dino.items()}}
            source += f" + {dino_path}"
        if use_norm and not any(k.startswith("model.1.norm.") for k in state_dict):
            logger.info("%s holds no ChannelNorm weights: keeping its defaults (weight 1, bias 0)", path)
            state_dict = {**state_dict, **{k: v for k, v in model.state_dict().items() if k.startswith("model.1.norm.")}}
        try:
            model.load_state_dict(state_dict)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
        return model.eval()
