"""MEt3RLoss and the one guidance objective: the MEt3R score of decoded views as a differentiable objective.

Typical use inside a diffusion training step (latents of V views per sample, batch layout)::

    x0 = predict_x0(model_pred, noisy_latents, timesteps, noise_scheduler)        # (B*V, C, h, w)
    views = decode_views(vae, x0, ViewLayout("batch", V), size=128)                # (B, V, 3, 128, 128)
    loss = diffusion_loss + lam * met3r_loss(views, timesteps=timesteps[::V])

Gradients flow through the metric's features (DINO + upsampler) into the views; the geometry network runs without
gradient and every metric weight is frozen. The objective is the metric's own per-pair score with `empty="zero"`
(`functional.pair_scores`): pairs whose renderings do not overlap score 0 with a zero gradient and are left out of
the mean. Guidance (`MEt3RCallback`, `pipelines/`) uses the same objective (`guidance_objective`) and the same
gradient post-processing (`guidance_direction`).
"""
from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any, Callable

import torch
from torch import nn

from . import functional
from .diffusion import decode_views, predict_x0
from .pairs import PairSpec, resolve_pairs
from .validation import check_finite, check_positive_int

__all__ = [
    "MEt3RLoss", "call_metric", "decode_views", "guidance_direction", "guidance_objective", "masked_pair_scores",
    "predict_x0",
]

logger = logging.getLogger(__name__)

REDUCTIONS = ("mean", "sum", "none")
# MEt3RLoss warns the first time nothing overlaps and then every this many such calls
_EMPTY_WARNING_EVERY = 100


def _accepts(metric: Callable[..., Any], argument: str) -> bool:
    target = metric.forward if isinstance(metric, nn.Module) else metric
    try:
        return argument in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def call_metric(metric: Callable[..., Any], views: torch.Tensor, pairs: PairSpec, **kwargs: Any) -> Any:
    """Run `metric(views, pairs=pairs, **kwargs)` whatever the views' dtype.

    A metric with lower-precision weights (bf16 / fp16) than the views runs under autocast to its dtype, so float32
    decoder outputs keep their precision where the metric compares RGB; views of lower precision than the metric
    are cast up. `empty=` is dropped for a metric that does not take it; other keywords pass unchanged.
    """
    dtype = getattr(metric, "dtype", None)
    if "empty" in kwargs and not _accepts(metric, "empty"):
        kwargs.pop("empty")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point) or views.dtype == dtype:
        return metric(views, pairs=pairs, **kwargs)
    if dtype in (torch.bfloat16, torch.float16) and views.dtype.itemsize > dtype.itemsize:
        # autocast takes float32 inputs only: float64 views are rounded to float32 first
        with torch.autocast(views.device.type, dtype=dtype):
            return metric(views.float(), pairs=pairs, **kwargs)
    return metric(views.to(dtype), pairs=pairs, **kwargs)


def _scores_and_valid(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair scores (B, P) and validity from a metric output.

    A metric without `valid` must not report non-finite scores: its NaN (a 0/0 for an empty overlap) would send a
    NaN gradient backwards through any masking, so it is refused rather than silently poisoning the training.
    """
    scores = output.pair_scores if hasattr(output, "pair_scores") else output.score
    scores = scores.reshape(scores.shape[0], -1)
    valid = getattr(output, "valid", None)
    if valid is None:
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(
                "the metric returned non-finite pair scores and no `valid` flags: use a metric that takes "
                "empty='zero' and returns `valid` (MEt3R does), so pairs without overlap contribute no NaN gradient"
            )
        valid = torch.ones_like(scores, dtype=torch.bool)
    valid = valid.reshape(scores.shape)
    return torch.where(valid, scores, torch.zeros_like(scores)), valid


def guidance_objective(metric: Callable[..., Any], views: torch.Tensor, pairs: PairSpec) -> tuple[Any, torch.Tensor]:
    """The metric's output for views (B, V, 3, H, W) and the per-sample objective (B,) to differentiate.

    The objective is the mean over the pairs that overlap of the metric's NaN-free pair scores (`empty="zero"`):
    MEt3R's score when every pair overlaps, 0 with a zero gradient for a sample where none does. A metric without
    `valid` flags is differentiated through its `.score` (or the tensor it returns); `guidance_direction` then
    leaves a sample whose gradient is not finite unguided.
    """
    output = call_metric(metric, views, pairs, empty="zero")
    if getattr(output, "valid", None) is None:  # no per-pair validity: differentiate its own score
        scores = output.score if hasattr(output, "score") else output
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"metric must return an object with .score or a tensor, got {type(output).__name__}")
        return output, scores.reshape(-1)
    scores, valid = _scores_and_valid(output)
    return output, functional.sample_scores(scores, valid, empty="zero")


def guidance_direction(
    grad: torch.Tensor, num_samples: int, normalize: bool = True, max_norm: float | None = None
) -> tuple[torch.Tensor, int]:
    """Post-process a guidance gradient (num_samples, ...): rows with NaN / inf set to 0, each row divided by its
    RMS (`normalize`), then its RMS capped at `max_norm`; returns the direction (shaped like `grad`) and how many
    rows were not finite."""
    num_samples = check_positive_int("num_samples", num_samples)
    max_norm = check_finite("max_norm", max_norm, positive=True, optional=True)
    if grad.ndim == 0 or grad.shape[0] % num_samples:
        raise ValueError(f"grad's first dimension {tuple(grad.shape)[:1]} is not a multiple of num_samples={num_samples}")
    # in at least float32: a float16 gradient's RMS would overflow (square) or underflow (the 1e-12 floor)
    per_sample = grad.reshape(num_samples, -1).to(torch.promote_types(grad.dtype, torch.float32))
    bad = ~torch.isfinite(per_sample).all(dim=1)
    num_bad = int(bad.sum())
    if num_bad:
        per_sample = torch.where(bad[:, None], torch.zeros_like(per_sample), per_sample)
    rms = per_sample.square().mean(dim=1, keepdim=True).sqrt()
    if normalize:
        per_sample = per_sample / rms.clamp_min(1e-12)
        rms = (rms > 0).to(rms.dtype)  # zero rows stay zero
    if max_norm is not None:
        per_sample = per_sample * (max_norm / rms.clamp_min(1e-12)).clamp(max=1.0)
    return per_sample.reshape(grad.shape).to(grad.dtype), num_bad


def masked_pair_scores(
    score_map: torch.Tensor, overlap_mask: torch.Tensor, num_pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deprecated: call the metric with `empty="zero"` and read `pair_scores` and `valid`."""
    warnings.warn(
        "masked_pair_scores is deprecated: call the metric with empty='zero' and read pair_scores and valid",
        FutureWarning, stacklevel=2,
    )
    n = score_map.shape[0]
    score_map = score_map.reshape(n, num_pairs, -1)
    mask = overlap_mask.reshape(n, num_pairs, -1).to(score_map.dtype)
    covered = mask.sum(-1)
    masked = torch.where(mask > 0, score_map, torch.zeros_like(score_map))
    return (masked * mask).sum(-1) / covered.clamp_min(1), covered > 0


class MEt3RLoss(nn.Module):
    """Mean MEt3R score over view pairs, as a loss on views (B, V, 3, H, W) in [-1, 1].

    Args:
        metric: a MEt3R metric (or any module with its call signature); its weights are frozen and it is kept
            in eval mode.
        pairs: pairs to score: "adjacent", "all", "reference" or an explicit list of (i, j).
        num_pairs: score a random subset of this many pairs per call (the same subset for the whole batch);
            `None` scores all of them.
        generator: torch.Generator for the pair subsampling; `None` uses the global RNG (which Accelerate's
            `save_state` / `load_state` restore).
        reduction: "mean" over contributing (sample, pair) scores, "sum", or "none" for a (B,) tensor of per-sample
            means (0 where nothing contributes).
        max_timestep: timestep gate: only samples with `timesteps <= max_timestep` contribute (x0 estimates are
            blurry at high noise); requires `timesteps` in the call.
        chunk_size: run the metric on at most this many samples at a time (bounds the geometry network's memory).

    After each call `last_contributing_fraction` holds the fraction of scored (sample, pair) scores that
    contributed (had overlap); when none did the loss is 0 and a warning is logged (the first time, then every
    100th time), so a regulariser that silently does nothing is visible.
    """

    def __init__(
        self,
        metric: Callable[..., Any],
        pairs: PairSpec = "adjacent",
        num_pairs: int | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        max_timestep: float | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__()
        if not callable(metric):
            raise TypeError(f"metric must be callable, got {type(metric).__name__}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(pairs, str) or pairs is None:
            resolve_pairs(pairs, 2)  # an unknown mode fails now, not at the first step
        if isinstance(metric, nn.Module):
            metric.requires_grad_(False).eval()
        self.metric = metric
        self.pairs = pairs
        self.num_pairs = check_positive_int("num_pairs", num_pairs, optional=True)
        self.generator = generator
        self.reduction = reduction
        self.max_timestep = check_finite("max_timestep", max_timestep, minimum=0, optional=True)
        self.chunk_size = check_positive_int("chunk_size", chunk_size, optional=True)
        self.last_contributing_fraction: float | None = None
        self._empty_calls = 0

    def train(self, mode: bool = True) -> MEt3RLoss:
        """Switching the loss to training mode leaves the metric in eval mode."""
        super().train(mode)
        if isinstance(self.metric, nn.Module):
            self.metric.eval()
        return self

    def select_pairs(self, num_views: int) -> list[tuple[int, int]]:
        """The pairs scored by the next call: all configured pairs, or a random subset of `num_pairs`."""
        pairs = resolve_pairs(self.pairs, num_views)
        if self.num_pairs is None or self.num_pairs >= len(pairs):
            return pairs
        order = torch.randperm(len(pairs), generator=self.generator)[: self.num_pairs]
        return [pairs[i] for i in sorted(order.tolist())]

    def pair_losses(self, views: torch.Tensor, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair scores (B, P), 0 where a pair has no overlap, and which of them overlap (B, P)."""
        scores, valid = [], []
        chunk = self.chunk_size or views.shape[0]
        for start in range(0, views.shape[0], chunk):
            output = call_metric(self.metric, views[start : start + chunk], pairs, empty="zero")
            chunk_scores, chunk_valid = _scores_and_valid(output)
            scores.append(chunk_scores)
            valid.append(chunk_valid)
        return torch.cat(scores), torch.cat(valid)

    def forward(self, views: torch.Tensor, timesteps: torch.Tensor | float | None = None) -> torch.Tensor:
        """Loss of views (B, V, 3, H, W) in [-1, 1]; `timesteps` (scalar or (B,)) feed the timestep gate."""
        if views.ndim != 5 or views.shape[2] != 3 or views.shape[1] < 2:
            raise ValueError(f"views must be (B, V>=2, 3, H, W), got shape {tuple(views.shape)}")
        batch = views.shape[0]
        keep = torch.ones(batch, dtype=torch.bool, device=views.device)
        if self.max_timestep is not None:
            if timesteps is None:
                raise ValueError("max_timestep is set: pass the samples' timesteps to the loss")
            timesteps = torch.as_tensor(timesteps, device=views.device).reshape(-1)
            if timesteps.numel() not in (1, batch):
                raise ValueError(
                    f"timesteps must be a scalar or hold one value per sample ({batch}), got {timesteps.numel()}"
                )
            keep = (timesteps <= self.max_timestep).expand(batch)

        # a zero that is still part of the graph, so that backward() works when nothing contributes; NaN-free (a
        # non-finite sample that the timestep gate leaves out must not reach the loss) and at least float32
        zero = (torch.nan_to_num(views, 0.0, 0.0, 0.0).sum() * 0.0).to(torch.promote_types(views.dtype, torch.float32))
        per_sample = zero.expand(batch).clone()
        total, count = zero, 0
        if bool(keep.any()):
            pairs = self.select_pairs(views.shape[1])
            scores, valid = self.pair_losses(views[keep], pairs)
            total = total + scores.sum()
            count = int(valid.sum())
            per_sample[keep] = functional.sample_scores(scores, valid, empty="zero").to(per_sample.dtype)
            self.last_contributing_fraction = count / valid.numel()
            if count == 0:
                self._warn_empty()
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return total
        return total / max(count, 1)

    def _warn_empty(self) -> None:
        if self._empty_calls % _EMPTY_WARNING_EVERY == 0:
            logger.warning(
                "MEt3RLoss: no scored pair overlapped, so the loss is 0 with no gradient (%d such calls so far)",
                self._empty_calls + 1,
            )
        self._empty_calls += 1
