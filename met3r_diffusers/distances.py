"""Per-pixel distances between the two renderings of a view pair, and their masked aggregation.

Every distance takes the two renderings `(N, C, H, W)` (zero where nothing was rendered) and
returns a per-pixel map `(N, H, W)`; `get_distance(name)` returns a `Distance`, which pairs that map with its
reduction to one score per pair (`Distance.reduce`: the masked mean, or the PSNR of the masked mean squared
error for ``psnr``), so callers never special-case a distance.

* ``cosine`` (MEt3R's default, on DINO/FeatUp features): ``1 - <a, b> / (|a| |b| + eps)`` with
  the eps added to the product of the norms, as the reference implementation does.
* ``mse``, ``rmse``, ``psnr``, ``ssim``, ``lpips`` compare rendered RGB images in [0, 1] (the
  newer MEt3R's behaviour for non-cosine distances). For ``psnr`` and ``ssim`` *higher* means
  more consistent. ``rmse`` is, as in the newer MEt3R, the masked mean of per-pixel RMSEs;
  ``psnr`` is that of the masked mean squared error. ``ssim`` needs `torchmetrics`, ``lpips``
  the `lpips` package. `dissimilarity` maps every score map to "0 = identical" for display.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch

DISTANCES = ("cosine", "mse", "rmse", "psnr", "ssim", "lpips")
# distances that compare features (everything else compares RGB renderings)
FEATURE_DISTANCES = ("cosine",)
# PSNR's per-pixel MSE floor: identical pixels read 100 dB instead of +inf
_PSNR_MSE_FLOOR = 1e-10


class _CosineDistance(torch.autograd.Function):
    """``1 - <a, b> / D`` with ``D = |a| |b| + eps``, and its gradient in two fused passes per input:
    ``d/da = g (-b / D + <a, b> |b| a / (|a| D^2))`` (and symmetrically for b), where autograd's chain
    through the dot product, both norms and the sum of the two paths makes about twice as many
    full-size passes (0.58 -> 0.35 s for one 256x256 pair with 384 channels)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        with torch.autocast(a.device.type, enabled=False):  # the dot product in the inputs' precision
            if a.device.type == "cpu":
                dot = torch.einsum("nchw,nchw->nhw", b, a)  # a contraction: no (N, C, H, W) product in memory
            else:
                dot = (b * a).sum(1)  # elementwise, so exact even where matrix products run in TF32
            norm_a, norm_b = torch.linalg.norm(a, dim=1), torch.linalg.norm(b, dim=1)
            denominator = norm_b * norm_a + eps
            ctx.save_for_backward(a, b, dot, norm_a, norm_b, denominator)
            return 1 - dot / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, b, dot, norm_a, norm_b, denominator = ctx.saved_tensors
        scale = grad / denominator  # (N, H, W)
        radial = scale * dot / denominator
        grad_a = grad_b = None
        # a zero vector has no direction: its norm's gradient is taken as 0, as autograd's norm does
        if ctx.needs_input_grad[0]:
            grad_a = torch.addcmul(-scale[:, None] * b, a, (radial * norm_b / norm_a.clamp_min(1e-30))[:, None])
        if ctx.needs_input_grad[1]:
            grad_b = torch.addcmul(-scale[:, None] * a, b, (radial * norm_a / norm_b.clamp_min(1e-30))[:, None])
        return grad_a, grad_b, None


def cosine_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``1 - <a, b> / (|a| |b| + eps)`` over channels: (N, C, H, W) x 2 -> (N, H, W)."""
    if a.shape != b.shape:  # the function has no broadcasting in its backward
        a, b = torch.broadcast_tensors(a, b)
    return _CosineDistance.apply(a, b, eps)


def mse_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the squared difference: (N, C, H, W) x 2 -> (N, H, W)."""
    return (a - b).square().mean(1)


def rmse_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Square root of `mse_distance` per pixel (clamped away from 0 so the gradient stays finite)."""
    return mse_distance(a, b).clamp_min(1e-12).sqrt()


def psnr_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel PSNR in dB for images in [0, 1] (higher = more similar)."""
    return -10 * torch.log10(mse_distance(a, b).clamp_min(_PSNR_MSE_FLOOR))


def ssim_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM map averaged over channels (needs torchmetrics; higher = more similar)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(a, b, data_range=1.0, return_full_image=True)
    return full.mean(1)


class _LPIPS:
    """Lazily built spatial LPIPS (AlexNet) from the `lpips` package."""

    def __init__(self):
        self.model = None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            import lpips

            self.model = lpips.LPIPS(net="alex", spatial=True, verbose=False).eval().requires_grad_(False)
        self.model.to(a.device)
        return self.model(2 * a - 1, 2 * b - 1)[:, 0]


@dataclass(frozen=True)
class Distance:
    """A per-pixel distance and its reduction to one score per pair; calling it gives the score map."""

    name: str
    score_map: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N, C, H, W) x 2 -> (N, H, W)
    reduce: Callable[..., torch.Tensor]  # (score_map (N, H, W), mask (N, H, W), eps) -> (N,), NaN if mask empty
    on_features: bool  # compares DINO/FeatUp features (else the [0, 1] RGB renderings)
    higher_is_better: bool  # psnr / ssim: higher = more similar

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.score_map(a, b)


def get_distance(name: str, eps: float = 1e-3) -> Distance:
    """The `Distance` called `name` (see DISTANCES; `eps` is cosine's); ImportError now if it needs a missing package."""
    needs = {"ssim": "torchmetrics", "lpips": "lpips"}
    if name in needs and importlib.util.find_spec(needs[name]) is None:
        raise ImportError(f"distance={name!r} needs the {needs[name]} package: pip install {needs[name]}")
    functions = {
        "cosine": functools.partial(cosine_distance, eps=eps),  # picklable, unlike a lambda
        "mse": mse_distance,
        "rmse": rmse_distance,
        "psnr": psnr_distance,
        "ssim": ssim_distance,
    }
    if name in functions:
        score_map = functions[name]
    elif name == "lpips":
        score_map = _LPIPS()
    else:
        raise ValueError(f"distance must be one of {DISTANCES}, got {name!r}")
    return Distance(
        name=name,
        score_map=score_map,
        reduce=masked_psnr if name == "psnr" else masked_mean,
        on_features=name in FEATURE_DISTANCES,
        higher_is_better=name in ("psnr", "ssim"),
    )


def dissimilarity(name: str, score_map: torch.Tensor) -> torch.Tensor:
    """A score map of distance `name` as a dissimilarity (0 = identical): 1 - SSIM, the MSE behind a PSNR."""
    if name == "ssim":
        return 1 - score_map
    if name == "psnr":
        return 10 ** (-score_map / 10)
    return score_map


def masked_mean(score_map: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``sum(map * mask) / (sum(mask) + eps)`` over the last two dims; NaN where the mask is empty.

    The reference returns 0 for an empty overlap, which reads as "perfectly consistent"; NaN says
    that nothing could be compared. The NaN is selected with `torch.where`, so its gradient is 0.
    """
    covered = mask.sum((-2, -1))
    # zero outside the mask first: a non-finite value where nothing was compared must not leak into the sum
    score = (torch.where(mask > 0, score_map, torch.zeros_like(score_map)) * mask).sum((-2, -1)) / (covered + eps)
    return torch.where(covered > 0, score, torch.full_like(score, math.nan))


def masked_psnr(score_map: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PSNR of the masked mean squared error, from a per-pixel PSNR map (dB); NaN where the mask is empty."""
    mse = masked_mean(10 ** (-score_map / 10), mask, eps)
    return -10 * torch.log10(mse.clamp_min(_PSNR_MSE_FLOOR))
