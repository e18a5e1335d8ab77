"""MEt3RLoss: the MEt3R score of decoded views as a differentiable training objective.

Typical use inside a diffusion training step (latents of V views per sample, batch layout)::

    x0 = predict_x0(model_pred, noisy_latents, timesteps, noise_scheduler)        # (B*V, C, h, w)
    views = decode_views(vae, x0, num_views=V, size=128)                         # (B, V, 3, 128, 128)
    loss = diffusion_loss + lam * met3r_loss(views, timesteps=timesteps[::V])

Gradients flow through the metric's features (DINO + upsampler) into the views; the geometry network runs without
gradient and every metric weight is frozen. Pairs whose renderings do not overlap contribute nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .diffusion import decode_latents, predict_x0
from .views import PairSpec, resolve_pairs

__all__ = ["MEt3RLoss", "decode_views", "masked_pair_scores", "predict_x0"]

REDUCTIONS = ("mean", "sum", "none")


def decode_views(
    vae,
    latents: torch.Tensor,
    num_views: int,
    size: int | Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
) -> torch.Tensor:
    """Decode (B*V, C, h, w) latents (V consecutive entries per sample) into views (B, V, 3, H, W) in [-1, 1].

    Differentiable w.r.t. `latents`. `size` decodes at a reduced resolution (see `decode_latents`);
    `gradient_checkpointing` recomputes the decoder in the backward pass instead of storing its activations.
    """
    if latents.ndim != 4 or latents.shape[0] % num_views:
        raise ValueError(
            f"latents must be (B*num_views, C, h, w) with num_views={num_views}, got {tuple(latents.shape)}"
        )
    if gradient_checkpointing and torch.is_grad_enabled():
        images = checkpoint(decode_latents, vae, latents, size, use_reentrant=False)
    else:
        images = decode_latents(vae, latents, size)
    return images.reshape(-1, num_views, *images.shape[1:])


def masked_pair_scores(
    score_map: torch.Tensor, overlap_mask: torch.Tensor, num_pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-free per-pair scores (B, P) and which pairs overlap at all (B, P), from a metric's maps.

    `score_map` and `overlap_mask` are (B, P, H, W), or (B, H, W) when P = 1. The score of a pair is
    `sum(mask * map) / max(sum(mask), 1)`, with the map zeroed outside the mask first, so a pair without overlap
    scores an exact 0 with a zero (finite) gradient instead of MEt3R's 0/0 = NaN.
    """
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
        if num_pairs is not None and num_pairs < 1:
            raise ValueError(f"num_pairs must be a positive int or None, got {num_pairs}")
        if max_timestep is not None and max_timestep < 0:
            raise ValueError(f"max_timestep must be >= 0 or None, got {max_timestep}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
        if isinstance(metric, nn.Module):
            metric.requires_grad_(False).eval()
        self.metric = metric
        self.pairs = pairs
        self.num_pairs = num_pairs
        self.generator = generator
        self.reduction = reduction
        self.max_timestep = max_timestep
        self.chunk_size = chunk_size

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
        """Per-pair scores (B, P) and which of them have any overlap (B, P), computed NaN-free.

        The score is recomputed from the score map and overlap mask as `sum(mask * map) / max(sum(mask), 1)`, so an
        empty overlap gives an exact 0 with a finite (zero) gradient instead of 0/0.
        """
        scores, valid = [], []
        chunk = self.chunk_size or views.shape[0]
        for start in range(0, views.shape[0], chunk):
            output = self.metric(
                views[start : start + chunk], pairs=pairs, return_score_map=True, return_overlap_mask=True
            )
            chunk_scores, chunk_valid = masked_pair_scores(output.score_map, output.overlap_mask, len(pairs))
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

        # a zero that is still part of the graph, so that backward() works when nothing contributes
        zero = views.sum() * 0.0
        per_sample = zero.expand(batch).clone()
        total, count = zero, 0
        if bool(keep.any()):
            pairs = self.select_pairs(views.shape[1])
            scores, valid = self.pair_losses(views[keep], pairs)
            scores = torch.where(valid, scores, torch.zeros_like(scores))
            total = total + scores.sum()
            count = int(valid.sum())
            per_sample[keep] = scores.sum(-1) / valid.sum(-1).clamp_min(1)
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return total
        return total / max(count, 1)
