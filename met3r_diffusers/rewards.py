"""MEt3R as a reward: per-sample rewards for reward fine-tuning (DRaFT / AlignProp) and GRPO-style trainers.

`MEt3RReward` turns the metric into a reward `-score` per sample of views (B, V, 3, H, W) in [-1, 1]::

    reward = MEt3RReward(metric, pairs="adjacent", differentiable=True)
    rewards, info = reward(views)            # (B,), {"pair_scores", "valid", "overlap", "num_empty_pairs", ...}
    loss = -rewards[info["valid_samples"]].mean()

The score of a sample is the metric's mean over the pairs whose renderings overlap (the NaN-free objective of
`loss.guidance_objective`): a pair without overlap contributes nothing, and a sample where no pair overlaps gets
`nan_reward` (NaN by default) as a constant without gradient. Such a sample would otherwise score 0, the best
possible reward, which a trainer could learn to reach by producing views that do not overlap; `info` counts them.

For trainers that take a reward callable (flow_grpo-style `reward_fn(images, prompts, metadata)`), bind the reward
with `functools.partial`; `group_advantages` is the GRPO normalisation within the samples of one prompt::

    score_fn = functools.partial(reward_fn, reward=MEt3RReward(metric, nan_reward=-1.0), num_views=4)
    for prompt in prompts:                                           # a minimal GRPO-style loop
        images, log_probs = sample_with_log_probs(pipe, [prompt] * G * 4)   # G samples of 4 views each
        rewards, info = score_fn(images, [prompt] * G * 4, {})       # (G*4,): each view gets its sample's reward
        advantages = group_advantages(rewards[::4], group_size=G)    # (G,), zero mean and unit std per group
        loss = -(advantages.repeat_interleave(4)[:, None] * log_probs).mean()   # + clipping / KL as usual

`image_statistics` gives the per-view contrast, saturation and mean colour that reveal a reward being gamed by
flattening or tinting the images.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .loss import guidance_objective
from .pairs import PairSpec, resolve_pairs
from .validation import check_finite, check_positive_int

__all__ = ["MEt3RReward", "group_advantages", "image_statistics", "reward_fn"]

logger = logging.getLogger(__name__)


# views beyond +-this are refused as a wrong value range (e.g. [0, 255] images)
_RANGE_LIMIT = 1.5

class MEt3RReward(nn.Module):
    """Per-sample reward `-MEt3R score` of views (B, V, 3, H, W) in [-1, 1], returned as `(rewards (B,), info)`.

    Args:
        metric: a MEt3R metric (or any module with its call signature); its weights are frozen, kept in eval mode.
        pairs: pairs to score: "adjacent", "all", "reference" or an explicit list of (i, j).
        nan_reward: reward of a sample where no pair overlaps (a constant, no gradient); `None` gives NaN.
        differentiable: keep the autograd graph (reward backprop); otherwise the metric runs under `no_grad`.
        chunk_size: run the metric on at most this many samples at a time.

    `info` holds `score` (B,) (NaN where no pair overlaps), `pair_scores` (B, P) (NaN where the pair has no
    overlap), `valid` (B, P) bool, `overlap` (B, P) overlap fractions, `valid_samples` (B,) bool, `pairs`, and the
    counts `num_empty_pairs` and `num_empty_samples`; its tensors are detached.
    """

    def __init__(
        self,
        metric: Callable[..., Any],
        pairs: PairSpec = "adjacent",
        nan_reward: float | None = None,
        differentiable: bool = False,
        chunk_size: int | None = None,
    ):
        super().__init__()
        if not callable(metric):
            raise TypeError(f"metric must be callable, got {type(metric).__name__}")
        if isinstance(pairs, str) or pairs is None:
            resolve_pairs(pairs, 2)  # an unknown mode fails now
        if isinstance(metric, nn.Module):
            metric.requires_grad_(False).eval()
        self.metric = metric
        self.pairs = pairs
        self.nan_reward = check_finite("nan_reward", nan_reward, optional=True)
        self.differentiable = bool(differentiable)
        self.chunk_size = check_positive_int("chunk_size", chunk_size, optional=True)

    def train(self, mode: bool = True) -> MEt3RReward:
        """Switching the reward to training mode leaves the metric in eval mode."""
        super().train(mode)
        if isinstance(self.metric, nn.Module):
            self.metric.eval()
        return self

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Rewards (B,) and the info dict for views (B, V, 3, H, W) in [-1, 1]."""
        if views.ndim != 5 or views.shape[2] != 3 or views.shape[1] < 2 or views.shape[0] == 0:
            raise ValueError(f"views must be (B>=1, V>=2, 3, H, W), got shape {tuple(views.shape)}")
        if not bool(torch.isfinite(views).all()):
            raise ValueError("views contain non-finite values (NaN or inf)")
        low, high = float(views.detach().min()), float(views.detach().max())
        # a gross range error ([0, 255] images) would give a wrong reward, not an error; the metric applies its own,
        # tighter tolerance (MEt3R: 1e-3), so a small overshoot from a decoder or an update step passes here
        if low < -_RANGE_LIMIT or high > _RANGE_LIMIT:
            raise ValueError(f"views must be in [-1, 1], got values in [{low:.4g}, {high:.4g}]")
        pairs = resolve_pairs(self.pairs, views.shape[1])
        chunk = self.chunk_size or views.shape[0]
        objectives, pair_scores, valid, overlap = [], [], [], []
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            for start in range(0, views.shape[0], chunk):
                output, objective = guidance_objective(self.metric, views[start : start + chunk], pairs)
                objectives.append(objective.float())
                scores = output if isinstance(output, torch.Tensor) else getattr(output, "pair_scores", output.score)
                scores = scores.detach().float()
                scores = scores.reshape(objective.shape[0], -1)
                chunk_valid = getattr(output, "valid", None)
                chunk_valid = torch.isfinite(scores) if chunk_valid is None else chunk_valid.reshape(scores.shape)
                pair_scores.append(torch.where(chunk_valid, scores, torch.full_like(scores, math.nan)))
                valid.append(chunk_valid)
                fraction = getattr(output, "overlap_fraction", None)
                overlap.append(chunk_valid.float() if fraction is None else fraction.detach().float().reshape(scores.shape))
        objective, pair_scores, valid = torch.cat(objectives), torch.cat(pair_scores), torch.cat(valid)
        valid_samples = valid.any(dim=1)
        fill = torch.full_like(objective, math.nan if self.nan_reward is None else self.nan_reward)
        rewards = torch.where(valid_samples, -objective, fill)
        num_empty_pairs = int((~valid).sum())
        if num_empty_pairs:
            logger.debug("MEt3RReward: %d of %d scored pairs had no overlap", num_empty_pairs, valid.numel())
        info = {
            "score": torch.where(valid_samples, objective.detach(), torch.full_like(fill, math.nan)),
            "pair_scores": pair_scores,
            "valid": valid,
            "overlap": torch.cat(overlap),
            "valid_samples": valid_samples,
            "pairs": pairs,
            "num_empty_pairs": num_empty_pairs,
            "num_empty_samples": int((~valid_samples).sum()),
        }
        return rewards, info


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages (N,): `(r - group mean) / (group std + eps)` over consecutive groups of `group_size` rewards.

    The samples of one prompt are consecutive (N = num_prompts * group_size). The standard deviation is the
    population one (as flow_grpo); NaN rewards are left out of their group's statistics and get advantage 0, and a
    group with fewer than two finite rewards gets advantage 0 throughout.
    """
    group_size = check_positive_int("group_size", group_size)
    eps = check_finite("eps", eps, minimum=0)
    rewards = torch.as_tensor(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {rewards.numel()} rewards")
    if bool(torch.isinf(rewards).any()):
        raise ValueError("rewards contain inf (NaN marks a sample without a reward; inf is refused)")
    groups = rewards.detach().double().reshape(-1, group_size)
    finite = torch.isfinite(groups)
    count = finite.sum(dim=1, keepdim=True)
    values = torch.where(finite, groups, torch.zeros_like(groups))
    mean = values.sum(dim=1, keepdim=True) / count.clamp_min(1)
    centred = torch.where(finite, groups - mean, torch.zeros_like(groups))
    std = (centred.square().sum(dim=1, keepdim=True) / count.clamp_min(1)).sqrt()
    advantages = torch.where(count >= 2, centred / (std + eps), torch.zeros_like(centred))
    return advantages.reshape(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def _as_image_tensor(images: Any) -> torch.Tensor:
    """Images (N, 3, H, W) / (B, V, 3, H, W) as a float tensor in [-1, 1] from [0, 1] floats, uint8 or PIL images."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
                           for image in images])
        images = torch.from_numpy(images).permute(0, 3, 1, 2)  # PIL / HWC arrays -> NCHW
    elif isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
        if images.shape[-1] == 3 and images.shape[-3] != 3:
            images = images.movedim(-1, -3)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor, an array or a list of images, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images.float() * 2 - 1


def reward_fn(
    images: Any,
    prompts: list[str],
    metadata: Any,
    *,
    reward: MEt3RReward,
    num_views: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The trainer-facing reward callable (bind `reward` and `num_views` with functools.partial): (rewards, info).

    `images` are in the pipelines' output convention: floats in [0, 1] (`output_type="pt"`), uint8, or a list of PIL
    images / HWC arrays. Views (B, V, 3, H, W) give one reward per sample (B,). Flat images (N, 3, H, W) hold
    consecutive groups of `num_views` views of one sample (the batch layout; `metadata["num_views"]` when
    `num_views` is None) and give one reward per image (N,), each view carrying its sample's reward, so that rewards
    pair one-to-one with the trainer's images. `prompts` are not used by MEt3R; `info` is `MEt3RReward`'s.
    """
    if not isinstance(reward, MEt3RReward):
        raise TypeError(f"reward must be a MEt3RReward, got {type(reward).__name__}")
    views = _as_image_tensor(images)
    if views.ndim == 4:
        if num_views is None and isinstance(metadata, dict):
            num_views = metadata.get("num_views")
        if num_views is None:
            raise ValueError("num_views is required for flat images (N, 3, H, W): views per sample")
        num_views = check_positive_int("num_views", num_views)
        if views.shape[0] % num_views:
            raise ValueError(f"num_views {num_views} does not divide the {views.shape[0]} images")
        rewards, info = reward(views.reshape(-1, num_views, *views.shape[1:]))
        return rewards.repeat_interleave(num_views), info
    if views.ndim != 5:
        raise ValueError(f"images must be (N, 3, H, W) or (B, V, 3, H, W), got shape {tuple(views.shape)}")
    if num_views is not None and num_views != views.shape[1]:
        raise ValueError(f"num_views={num_views} but the images hold {views.shape[1]} views per sample")
    return reward(views)


def image_statistics(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-view statistics (B, V) of views (B, V, 3, H, W) in [-1, 1]: contrast, saturation, mean red/green/blue.

    Contrast is the standard deviation of the luminance (Rec. 601) over pixels, saturation the mean HSV saturation,
    and the mean colours are per channel, all on images mapped to [0, 1].
    """
    if views.ndim != 5 or views.shape[2] != 3:
        raise ValueError(f"views must be (B, V, 3, H, W), got shape {tuple(views.shape)}")
    images = ((views.detach().float() + 1) / 2).clamp(0, 1)
    luminance = 0.299 * images[:, :, 0] + 0.587 * images[:, :, 1] + 0.114 * images[:, :, 2]
    high, low = images.amax(dim=2), images.amin(dim=2)
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-12), torch.zeros_like(high))
    means = images.mean(dim=(-2, -1))
    return {
        "contrast": luminance.flatten(-2).std(dim=-1),
        "saturation": saturation.mean(dim=(-2, -1)),
        "mean_red": means[..., 0],
        "mean_green": means[..., 1],
        "mean_blue": means[..., 2],
    }
