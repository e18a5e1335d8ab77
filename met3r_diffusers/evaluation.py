"""Evaluation with MEt3R: `MEt3RMetric` (a torchmetrics `Metric`) and `MEt3REvalHook` (Accelerate training loops).

`MEt3RMetric` accumulates per-sample results over batches and synchronises them across processes the torchmetrics
way (states registered with `dist_reduce_fx="cat"`), so it works in Lightning, plain DDP and Accelerate alike::

    evaluator = MEt3RMetric(metric, pairs="adjacent")
    for views in loader:
        evaluator.update(views)
    evaluator.compute()   # {"score", "pair_scores", "overlap_fraction", "num_samples", "num_empty"}

`MEt3REvalHook` samples a fixed set of validation inputs every N steps, scores the sampled views with MEt3R on every
process, gathers the scores (`accelerator.gather_for_metrics`), logs scalars and image/heatmap panels to the
accelerator's trackers and returns the numbers::

    hook = MEt3REvalHook(accelerator, every_n_steps=500, sample_fn=sample, metric=metric, inputs=prompts)
    for step, batch in enumerate(loader, start=1):
        ...
        results = hook(step)        # None except every 500 steps

Every validation input `k` is sampled with its own generator seeded `seed + k`, and the inputs are sharded by a
prepared DataLoader, so the gathered numbers do not depend on the number of processes.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .loss import call_metric
from .pairs import PairSpec, resolve_pairs
from .validation import check_finite

__all__ = ["MEt3REvalHook", "MEt3REvaluator", "MEt3RMetric"]


class MEt3RMetric(Metric):
    """MEt3R accumulated over batches: `update(images (B, V, 3, H, W), **kwargs)`, `compute()`, `reset()`.

    Args:
        metric: a `MEt3R` (or a callable with its signature and output fields).
        pairs: view pairs scored in every batch (every batch must give the same number of pairs).
        min_overlap: pairs whose overlap fraction is below it count as empty (see `MEt3R.forward`).
        kwargs: torchmetrics `Metric` options (`dist_sync_on_step`, `sync_on_compute`, ...).

    `compute()` returns "score" (mean over samples, leaving out samples whose pairs all lack overlap),
    "pair_scores" (P,) (mean per pair over the samples where it overlaps), "overlap_fraction" (mean),
    "num_samples" and "num_empty" (samples left out of the mean), over every process when torch.distributed runs.
    """

    higher_is_better = False
    is_differentiable = True
    full_state_update = False

    def __init__(
        self, metric: Callable[..., Any], pairs: PairSpec = None, min_overlap: float | None = None, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.min_overlap = check_finite("min_overlap", min_overlap, minimum=0, optional=True)
        if not callable(metric):
            raise TypeError(f"metric must be callable, got {type(metric).__name__}")
        # Held outside the module tree: its frozen weights stay out of this metric's state_dict (a checkpoint of
        # the real networks would carry ~2.6 GB) and train() leaves it alone; _apply still moves it (.to(), .cuda()).
        object.__setattr__(self, "metric", metric)
        self.pairs = pairs
        self.last_output: Any = None  # the latest batch's metric output
        distance = getattr(metric, "distance_fn", None)
        if distance is not None and distance.higher_is_better:  # psnr / ssim
            object.__setattr__(self, "higher_is_better", True)  # torchmetrics guards the class constant
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("pair_scores", default=[], dist_reduce_fx="cat")
        self.add_state("overlap_fractions", default=[], dist_reduce_fx="cat")

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> MEt3RMetric:
        if isinstance(self.metric, torch.nn.Module):
            self.metric._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def update(self, images: torch.Tensor, **kwargs: Any) -> None:
        """Score one batch (B, V, 3, H, W) in [-1, 1] and keep its per-sample results.

        torchmetrics runs `update` without gradient, and `metric(images)` (its `forward`) with it: the batch's value
        is then differentiable w.r.t. the images (`is_differentiable`).
        """
        if self.min_overlap is not None:
            kwargs.setdefault("min_overlap", self.min_overlap)
        output = call_metric(self.metric, images, self.pairs, **kwargs)
        pair_scores = output.pair_scores.float().reshape(images.shape[0], -1)
        if self.pair_scores and pair_scores.shape[1] != self.pair_scores[0].shape[1]:
            raise ValueError("every batch must score the same number of pairs (same V and pairs)")
        self.last_output = output
        self.scores.append(output.score.float().reshape(-1))
        self.pair_scores.append(pair_scores)
        self.overlap_fractions.append(output.overlap_fraction.float().reshape(images.shape[0], -1))

    def reset(self) -> None:
        """Forget every batch seen (and the latest output)."""
        super().reset()
        self.last_output = None

    def compute(self) -> dict[str, Any]:
        """Means over all samples seen (by all processes); see the class docstring for the keys."""
        if isinstance(self.scores, list) and not self.scores:
            raise RuntimeError("MEt3RMetric.compute() called before any update()")
        scores = dim_zero_cat(self.scores)
        pair_scores = dim_zero_cat(self.pair_scores)
        fractions = dim_zero_cat(self.overlap_fractions)
        with warnings.catch_warnings():  # a pair that never overlaps has a NaN mean, by design
            warnings.simplefilter("ignore")
            return {
                "score": scores.nanmean(),
                "pair_scores": pair_scores.nanmean(0),
                "overlap_fraction": fractions.mean(),
                "num_samples": int(scores.shape[0]),
                "num_empty": int(scores.isnan().sum()),
            }


class MEt3REvaluator(MEt3RMetric):
    """Deprecated alias of `MEt3RMetric` (same arguments and results)."""

    def __init__(self, metric: Callable[..., Any], pairs: PairSpec = None, **kwargs: Any):
        warnings.warn("MEt3REvaluator is deprecated: use MEt3RMetric", FutureWarning, stacklevel=2)
        super().__init__(metric, pairs=pairs, **kwargs)
        wrapped = self.update  # torchmetrics' wrapper drops the return value; 0.1's update returned the output

        def update(images: torch.Tensor, **update_kwargs: Any) -> Any:
            wrapped(images, **update_kwargs)
            return self.last_output

        self.update = update


class MEt3REvalHook:
    """Every `every_n_steps` steps: sample fixed validation inputs, score them with MEt3R, gather, log, return.

    Args:
        accelerator: the training script's `accelerate.Accelerator`.
        every_n_steps: evaluate when `step % every_n_steps == 0` (0 disables periodic evaluation; `evaluate` still
            works).
        sample_fn: `sample_fn(inputs: list, generators: list[torch.Generator]) -> views (b, V, 3, H, W)` in [-1, 1],
            one generator per input; called under `torch.no_grad()`.
        metric: a MEt3R metric: `metric(views, pairs=..., return_score_map=..., return_overlap_mask=...)`.
        inputs: the fixed validation inputs (prompts, conditioning dicts, ...), any sequence.
        pairs: view pairs to score ("adjacent", "all", "reference" or a list of (i, j)).
        batch_size: inputs sampled per `sample_fn` call on each process.
        seed: input `k` is sampled with a generator seeded `seed + k`.
        generator_device: device of those generators.
        num_logged_samples: how many samples (from the main process) are logged as image panels (views above, score
            heatmaps below); 0 logs scalars only.
        prefix: name prefix of the logged values.
    """

    def __init__(
        self,
        accelerator,
        every_n_steps: int,
        sample_fn: Callable[[list, list[torch.Generator]], torch.Tensor],
        metric: Callable[..., Any],
        inputs: Sequence[Any],
        pairs: PairSpec = "adjacent",
        batch_size: int = 1,
        seed: int = 0,
        generator_device: str | torch.device = "cpu",
        num_logged_samples: int = 2,
        prefix: str = "met3r",
    ):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if not callable(sample_fn) or not callable(metric):
            raise TypeError("sample_fn and metric must be callable")
        if len(inputs) == 0:
            raise ValueError("inputs must hold at least one validation input")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.accelerator = accelerator
        self.every_n_steps = every_n_steps
        self.sample_fn = sample_fn
        self.metric = metric
        self.inputs = list(inputs)
        self.pairs = pairs
        self.seed = seed
        self.generator_device = generator_device
        self.num_logged_samples = num_logged_samples
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []
        from accelerate.data_loader import prepare_data_loader

        # Sharded like any prepared loader (padding the last batch by cycling, which gather_for_metrics drops again),
        # but not registered with the accelerator, so that save_state/load_state are unaffected.
        loader = torch.utils.data.DataLoader(range(len(self.inputs)), batch_size=batch_size, shuffle=False)
        self._loader = prepare_data_loader(
            loader,
            device=accelerator.device,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            put_on_device=True,
        )

    def __call__(self, step: int) -> dict[str, Any] | None:
        """Evaluate if `step` is a multiple of `every_n_steps`; returns the results or None."""
        if self.every_n_steps == 0 or step % self.every_n_steps:
            return None
        return self.evaluate(step)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Sample, score, gather and log now; returns the gathered numbers (identical on every process).

        The result holds `score` (mean over samples, ignoring pairs without overlap), `pair_scores`
        ({"i-j": mean}), `overlap` (mean overlap fraction), `num_samples`, and the gathered per-sample tensors
        `scores` (N,) and `pair_score_matrix` (N, P) on the CPU.
        """
        accelerator = self.accelerator
        log_images = self.num_logged_samples > 0 and accelerator.is_main_process
        gathered: dict[str, list[torch.Tensor]] = {"score": [], "pair_scores": [], "overlap_fraction": []}
        panels, pairs = [], None
        for indices in self._loader:
            indices = indices.tolist()
            generators = [torch.Generator(self.generator_device).manual_seed(self.seed + k) for k in indices]
            views = self.sample_fn([self.inputs[k] for k in indices], generators)
            if views.ndim != 5:
                raise ValueError(f"sample_fn must return views (b, V, 3, H, W), got shape {tuple(views.shape)}")
            pairs = resolve_pairs(self.pairs, views.shape[1])
            want_maps = log_images and len(panels) < self.num_logged_samples
            output = self.metric(views, pairs=pairs, return_score_map=want_maps, return_overlap_mask=want_maps)
            local = {
                "score": output.score.float(),
                "pair_scores": output.pair_scores.float().reshape(views.shape[0], -1),
                "overlap_fraction": output.overlap_fraction.float().reshape(views.shape[0], -1),
            }
            for key, value in accelerator.gather_for_metrics(local).items():
                gathered[key].append(value.cpu())
            if want_maps:
                for b in range(min(views.shape[0], self.num_logged_samples - len(panels))):
                    panels.append(_panel(views[b], output.score_map[b], output.overlap_mask[b], len(pairs)))

        scores = torch.cat(gathered["score"])
        pair_matrix = torch.cat(gathered["pair_scores"])
        overlap = torch.cat(gathered["overlap_fraction"])
        results = {
            "step": step,
            "score": _nanmean(scores),
            "pair_scores": {f"{i}-{j}": _nanmean(pair_matrix[:, k]) for k, (i, j) in enumerate(pairs)},
            "overlap": float(overlap.mean()),
            "num_samples": scores.numel(),
            "scores": scores,
            "pair_score_matrix": pair_matrix,
        }
        values = {f"{self.prefix}/score": results["score"], f"{self.prefix}/overlap": results["overlap"]}
        values.update({f"{self.prefix}/pair_{name}": value for name, value in results["pair_scores"].items()})
        accelerator.log(values, step=step)
        if panels:
            self._log_panels(panels, step)
        self.history.append({k: v for k, v in results.items() if k not in ("scores", "pair_score_matrix")})
        return results

    def _log_panels(self, panels: list[np.ndarray], step: int) -> None:
        """Send image panels (H, W, 3) uint8 to the trackers that take images (tensorboard, wandb)."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                for n, panel in enumerate(panels):
                    tracker.writer.add_image(f"{self.prefix}/sample_{n}", panel, step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({f"{self.prefix}/samples": [wandb.Image(panel) for panel in panels]}, step=step)


def _nanmean(values: torch.Tensor) -> float:
    """Mean of the finite entries (NaN marks pairs without overlap); NaN when there are none."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def _heatmap(score_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Score map (H, W) -> RGB (3, H, W) in [0, 1]: blue (0, consistent) to red (>= 1); grey outside the overlap."""
    value = score_map.float().nan_to_num(0).clamp(0, 1)
    rgb = torch.stack([value, 0.2 * torch.ones_like(value), 1 - value])
    return torch.where(mask.bool(), rgb, torch.full_like(rgb, 0.5))


def _panel(views: torch.Tensor, score_maps: torch.Tensor, masks: torch.Tensor, num_pairs: int) -> np.ndarray:
    """One sample as an image: its V views in a row, the P pair heatmaps in the row below."""
    views = (views.float().cpu().clamp(-1, 1) + 1) / 2  # (V, 3, H, W)
    height, width = views.shape[-2:]
    score_maps = score_maps.reshape(num_pairs, *score_maps.shape[-2:]).cpu()
    masks = masks.reshape(num_pairs, *masks.shape[-2:]).cpu()
    heatmaps = torch.stack([_heatmap(m, k) for m, k in zip(score_maps, masks)])
    heatmaps = torch.nn.functional.interpolate(heatmaps, size=(height, width), mode="nearest")
    columns = max(views.shape[0], num_pairs)
    canvas = torch.ones(3, 2 * height, columns * width)
    for v, view in enumerate(views):
        canvas[:, :height, v * width : (v + 1) * width] = view
    for p, heatmap in enumerate(heatmaps):
        canvas[:, height:, p * width : (p + 1) * width] = heatmap
    return (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
