"""diffusers callback that scores the decoded views with MEt3R while a pipeline samples, and optionally guides it.

```python
metric = MEt3R(...)
callback = MEt3RCallback(metric, every_n_steps=5, num_views=4, guidance_scale=0.1)
with callback.attach(pipe):
    images = pipe(prompt, num_images_per_prompt=4, callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=callback.tensor_inputs).images
callback.history      # [{"step", "timestep", "scores" (B,), "pair_scores" (B, n_pairs), "pairs"}, ...]
```

How it works. A step-end callback only sees the latents *after* the scheduler step, and pipelines throw away the
model output and the scheduler's x0 estimate (`return_dict=False`). The callback therefore wraps
`pipeline.scheduler.step` (an instance attribute shadowing the class method): the wrapper calls the original step
with `return_dict=True`, records `pred_original_sample` (or LCM's `denoised`) when the scheduler returns one and
otherwise derives x0 from the model output with `predict_x0`, and hands the pipeline exactly what it asked for, so
sampling is bit-identical. The wrapper is installed by `attach(pipe)` or, failing that, on the callback's first
call -- which comes *after* step 0's scheduler step, so an unattached callback cannot score step 0 (it warns once).
It is removed after the final step, by `close()`, or on leaving the `with` block (also when the pipeline raises);
removing it twice is harmless.

Guidance (`guidance_scale > 0`) is an approximation: inside the guidance window, the gradient of the MEt3R score
with respect to this step's x0 estimate is taken through the decoder (grad is re-enabled locally: pipelines run
under `torch.no_grad()`), normalised per sample, and the latents that the scheduler just produced are moved so that
the clean sample they imply shifts by `-guidance_scale * direction` (latent units, RMS per sample): the change is
scaled by the coefficient of x0 in the next noisy sample (`sqrt(alphas_cumprod)` for DDPM-style schedulers, 1 for
Euler-style sigma space, `1 - sigma` for flow matching). The denoiser is not differentiated (that is the exact
classifier-guidance variant in `pipelines/met3r_guided_multiview.py`). Multistep schedulers (DPM-Solver++, UniPC,
DEIS) keep a history of earlier x0 predictions that the edit does not touch: their next update combines the edited
sample with that history, so the higher-order correction sees the guidance shift as a change of the model's
prediction and extrapolates it a little further; the run still converges, the guided shift is just not exactly
`guidance_scale` per step. Pairs without overlap (MEt3R scores them NaN, and the 0/0 behind that NaN sends NaN
gradients backwards) must not poison the latents: with a metric that can return its score map and overlap mask
(`MEt3R`), the guided objective is recomputed from them as in `MEt3RLoss` (such pairs contribute nothing);
with any other metric, a sample whose gradient is not finite gets no guidance at that step (with a warning).
Randomness: the callback draws no random numbers itself.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import torch
from diffusers.callbacks import PipelineCallback
from torch import nn
from typing_extensions import Self

from .diffusion import _is_sigma_space, _sample_coefficients, decode_latents, predict_x0
from .loss import MEt3RLoss, masked_pair_scores
from .views import PairSpec, ViewLayout, resolve_pairs

DecodeFn = Callable[[torch.Tensor], torch.Tensor]


class MEt3RCallback(PipelineCallback):
    """Score the decoded views with MEt3R every `every_n_steps` steps and optionally guide sampling with its gradient.

    Args:
        metric: a callable `metric(views (B, V, 3, H, W) in [-1, 1], pairs=...)` returning an object with `.score`
            (B,) and optionally `.pair_scores` (B, n_pairs) -- an `MEt3R` -- or a tensor of per-sample scores;
            an `MEt3RLoss` is accepted too (its metric is used, with this callback's `pairs`). It must be
            differentiable with respect to the views when `guidance_scale > 0`.
        every_n_steps: score when `step_index % every_n_steps == 0` inside the scoring window; the final step is
            always scored (whatever the window).
        num_views: views per sample (see `ViewLayout`); `None` = all batch entries / frames / tiles.
        layout: `"batch"`, `"frames"`, `"frames:bcfhw"`, `"grid:RxC"` or a `ViewLayout`.
        pairs: which view pairs to score, passed to the metric (`"adjacent"`, `"all"`, `"reference"`, list).
        start, stop: scoring window as fractions of the number of denoising steps (`start*T <= i < stop*T`).
        guidance_scale: size of the guided shift of the implied clean sample per step; 0 only scores.
        guidance_start, guidance_stop: guidance window, fractions of the steps like `start` / `stop`.
        decode_size: pixel size (int or (H, W)) of each *view* to decode and score at; latents are downscaled
            before decoding, which bounds the decoder's cost. `None` = the VAE's native size.
        decode_fn: `decode_fn(latents) -> images (N, 3, H, W) in [-1, 1]` replacing the pipeline's VAE; it gets
            the layout's latents to decode (`(N, C, h, w)`; packed latents unchanged with the batch / grid layouts)
            and must return the decoded images in order. Use it for custom latent scalings (Zero123++) or packed
            latents (Flux, LTX).
        normalize_grad: divide each sample's gradient by its RMS before stepping (the step size is then exactly
            `guidance_scale`); otherwise the raw gradient is used.
        max_grad_norm: optional cap on the RMS of each sample's step direction (after normalisation, if any).
    """

    @property
    def tensor_inputs(self) -> list[str]:
        """The callback tensors it reads and edits: `["latents"]`."""
        return ["latents"]

    def __init__(
        self,
        metric: Callable[..., Any],
        every_n_steps: int = 1,
        num_views: int | None = None,
        layout: str | ViewLayout = "batch",
        pairs: PairSpec = "adjacent",
        start: float = 0.0,
        stop: float = 1.0,
        guidance_scale: float = 0.0,
        guidance_start: float = 0.0,
        guidance_stop: float = 1.0,
        decode_size: int | tuple[int, int] | None = None,
        decode_fn: DecodeFn | None = None,
        normalize_grad: bool = True,
        max_grad_norm: float | None = None,
    ):
        super().__init__()
        if isinstance(metric, MEt3RLoss):
            metric = metric.metric
        if not callable(metric):
            raise TypeError(f"metric must be callable, got {type(metric).__name__}")
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        windows = {"start/stop": (start, stop), "guidance_start/guidance_stop": (guidance_start, guidance_stop)}
        for name, (low, high) in windows.items():
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 <= start <= stop <= 1, got ({low}, {high})")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        if decode_size is not None:
            size = (decode_size, decode_size) if isinstance(decode_size, int) else tuple(decode_size)
            if len(size) != 2 or min(size) <= 0:
                raise ValueError(f"decode_size must be a positive int or (H, W), got {decode_size!r}")
            decode_size = size
        self.metric = metric
        self.every_n_steps = every_n_steps
        self.layout = ViewLayout.parse(layout, num_views)
        self.pairs = pairs
        self.window = (start, stop)
        self.guidance_scale = float(guidance_scale)
        self.guidance_window = (guidance_start, guidance_stop)
        self.decode_size = decode_size
        self.decode_fn = decode_fn
        self.normalize_grad = normalize_grad
        self.max_grad_norm = max_grad_norm
        self.history: list[dict[str, Any]] = []
        self._scheduler = None
        self._record: tuple[torch.Tensor, Any] | None = None
        self._warned_missing = False
        self._warned_nonfinite = False

    # ------------------------------------------------------------------ scheduler wrapper

    def attach(self, pipeline) -> MEt3RCallback:
        """Wrap `pipeline.scheduler.step` now (so that step 0 can be scored); use as `with callback.attach(pipe):`."""
        scheduler = pipeline.scheduler
        if self._scheduler is scheduler:
            return self
        self.close()
        original = scheduler.step  # the bound class method
        signature = inspect.signature(original)
        supports_return_dict = "return_dict" in signature.parameters

        def step(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            return_dict = bound.arguments.get("return_dict", True)
            if supports_return_dict:
                bound.arguments["return_dict"] = True
            output = original(*bound.args, **bound.kwargs)
            self._capture(scheduler, bound.arguments, output)
            if supports_return_dict and not return_dict:
                return output.to_tuple()
            return output

        scheduler.step = step
        self._scheduler = scheduler
        self._record = None
        return self

    def close(self) -> None:
        """Remove the scheduler wrapper (idempotent)."""
        if self._scheduler is not None:
            self._scheduler.__dict__.pop("step", None)
        self._scheduler = None
        self._record = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _capture(self, scheduler, arguments: dict[str, Any], output: Any) -> None:
        """Record this step's x0 estimate (detached) and timestep."""
        timestep = arguments["timestep"]
        x0 = None
        if not isinstance(output, tuple):
            x0 = getattr(output, "pred_original_sample", None)
            if x0 is None:
                x0 = getattr(output, "denoised", None)
        if x0 is None:
            x0 = predict_x0(arguments["model_output"], arguments["sample"], timestep, scheduler)
        self._record = (x0.detach(), timestep)

    # ------------------------------------------------------------------ callback

    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Score (and guide) at this step; returns the (possibly updated) callback tensors."""
        if self._scheduler is not pipeline.scheduler:
            self.attach(pipeline)
        num_steps = _num_steps(pipeline)
        is_final = step_index >= num_steps - 1
        record, self._record = self._record, None

        score_now = is_final or (
            self._in_window(step_index, num_steps, self.window) and step_index % self.every_n_steps == 0
        )
        guide_now = self.guidance_scale > 0 and self._in_window(step_index, num_steps, self.guidance_window)
        try:
            if not (score_now or guide_now):
                return callback_kwargs
            if record is None:
                if not self._warned_missing:
                    warnings.warn(
                        f"MEt3RCallback: no x0 estimate for step {step_index} (the scheduler wrapper is installed on "
                        "the first callback, after step 0); use `with callback.attach(pipe):` to score from step 0",
                        stacklevel=2,
                    )
                    self._warned_missing = True
                return callback_kwargs
            x0 = record[0]
            if guide_now:
                output, grad = self._score_and_grad(pipeline, x0)
                latents = callback_kwargs["latents"]
                coefficient = _next_x0_coefficient(pipeline, step_index, num_steps)
                callback_kwargs["latents"] = latents - (coefficient * self.guidance_scale) * grad.to(latents.dtype)
            else:
                with torch.no_grad():
                    output = self._score(pipeline, x0)
            if score_now:
                self.history.append(_history_entry(step_index, timestep, *output))
            return callback_kwargs
        finally:
            if is_final:
                self.close()

    @staticmethod
    def _in_window(step_index: int, num_steps: int, window: tuple[float, float]) -> bool:
        return window[0] * num_steps <= step_index < window[1] * num_steps

    def _score(self, pipeline, x0: torch.Tensor) -> tuple[Any, list[tuple[int, int]]]:
        """Decode x0 (pipeline layout) into views and run the metric; also returns the scored pairs."""
        views = self._views(pipeline, x0)
        return self.metric(views, pairs=self.pairs), resolve_pairs(self.pairs, views.shape[1])

    def _views(self, pipeline, x0: torch.Tensor) -> torch.Tensor:
        """Decode x0 (pipeline layout) into views (B, V, 3, H, W)."""
        latents, batch_size = self.layout.to_decode(x0, _latent_channels(pipeline))
        if self.decode_fn is not None:
            images = self.decode_fn(latents)
        else:
            images = decode_latents(
                pipeline.vae,
                latents,
                size=self._image_size(),
                num_frames=latents.shape[0] // batch_size if self.layout.kind == "frames" else None,
            )
        return self.layout.to_views(images, batch_size)

    def _image_size(self) -> tuple[int, int] | None:
        if self.decode_size is None or self.layout.kind != "grid":
            return self.decode_size
        rows, cols = self.layout.grid
        return self.decode_size[0] * rows, self.decode_size[1] * cols

    def _score_and_grad(self, pipeline, x0: torch.Tensor) -> tuple[tuple[Any, list], torch.Tensor]:
        """`_score`'s result and the per-sample normalised step direction d(score)/d(x0), shaped like x0."""
        with torch.enable_grad():
            x0 = x0.detach().float().requires_grad_(True)
            views = self._views(pipeline, x0)
            metric_output, objective = guidance_scores(self.metric, views, self.pairs)
            (grad,) = torch.autograd.grad(objective.sum(), x0)
        output = (metric_output, resolve_pairs(self.pairs, views.shape[1]))
        per_sample, num_bad = zero_nonfinite_samples(grad, views.shape[0])
        if num_bad and not self._warned_nonfinite:
            warnings.warn(
                f"MEt3RCallback: the metric's gradient is not finite for {num_bad} sample(s) (pairs without overlap "
                "scored NaN?); those samples are not guided at this step",
                stacklevel=3,
            )
            self._warned_nonfinite = True
        rms = per_sample.square().mean(dim=1, keepdim=True).sqrt()
        if self.normalize_grad:
            per_sample = per_sample / rms.clamp_min(1e-12)
            rms = torch.ones_like(rms)
        if self.max_grad_norm is not None:
            per_sample = per_sample * (self.max_grad_norm / rms.clamp_min(1e-12)).clamp(max=1.0)
        return output, per_sample.reshape(grad.shape)

    # ------------------------------------------------------------------ history

    def history_rows(self) -> list[dict[str, Any]]:
        """`history` flattened to one row per (step, sample): step, timestep, sample, score, pair_i_j columns."""
        rows = []
        for entry in self.history:
            pair_scores = entry["pair_scores"]
            names = [f"pair_{i}_{j}" for i, j in entry["pairs"]]
            for sample, score in enumerate(entry["scores"].tolist()):
                row = {"step": entry["step"], "timestep": entry["timestep"], "sample": sample, "score": score}
                if pair_scores is not None:
                    row.update(zip(names, pair_scores[sample].tolist()))
                rows.append(row)
        return rows

    def plot_history(self, ax=None):
        """Plot each sample's score against the step with matplotlib (optional dependency); returns the axes."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("plot_history needs matplotlib: pip install matplotlib") from error
        if ax is None:
            _, ax = plt.subplots()
        if self.history:
            steps = [entry["step"] for entry in self.history]
            scores = torch.stack([entry["scores"] for entry in self.history])  # (steps, B)
            for sample in range(scores.shape[1]):
                ax.plot(steps, scores[:, sample].tolist(), marker="o", label=f"sample {sample}")
            ax.legend()
        ax.set_xlabel("denoising step")
        ax.set_ylabel("MEt3R score (lower = more consistent)")
        return ax


def _takes_maps(metric: Callable[..., Any]) -> bool:
    """Whether `metric` accepts `return_score_map` and `return_overlap_mask` (as `MEt3R` does)."""
    target = metric.forward if isinstance(metric, nn.Module) else metric
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "return_score_map" in parameters and "return_overlap_mask" in parameters


def guidance_scores(metric: Callable[..., Any], views: torch.Tensor, pairs: PairSpec) -> tuple[Any, torch.Tensor]:
    """The metric's output for views (B, V, 3, H, W) and a per-sample objective (B,) to differentiate for guidance.

    With a metric that returns its score map and overlap mask (`MEt3R`), the objective is the mean over the pairs
    that overlap of `masked_pair_scores` (MEt3R's score when every pair overlaps), so pairs without overlap
    contribute nothing and no NaN reaches the gradient; otherwise it is the metric's `.score`.
    """
    if not _takes_maps(metric):
        output = metric(views, pairs=pairs)
        return output, _scores(output)
    num_pairs = len(resolve_pairs(pairs, views.shape[1]))
    output = metric(views, pairs=pairs, return_score_map=True, return_overlap_mask=True)
    scores, valid = masked_pair_scores(output.score_map, output.overlap_mask, num_pairs)
    valid = valid.to(scores.dtype)
    return output, (scores * valid).sum(1) / valid.sum(1).clamp_min(1)


def zero_nonfinite_samples(grad: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, int]:
    """`grad` as (num_samples, -1) with the rows holding any NaN / inf set to 0; also returns how many rows."""
    per_sample = grad.reshape(num_samples, -1)
    bad = ~torch.isfinite(per_sample).all(dim=1)
    num_bad = int(bad.sum())
    if num_bad:
        per_sample = torch.where(bad[:, None], torch.zeros_like(per_sample), per_sample)
    return per_sample, num_bad


def _scores(output: Any) -> torch.Tensor:
    """Per-sample scores (B,) from a metric output or a plain tensor."""
    scores = output.score if hasattr(output, "score") else output
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"metric must return an object with .score or a tensor, got {type(output).__name__}")
    return scores.reshape(-1)


def _history_entry(step_index: int, timestep: Any, output: Any, pairs: list[tuple[int, int]]) -> dict[str, Any]:
    timestep = timestep.item() if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 else timestep
    pair_scores = getattr(output, "pair_scores", None)
    scores = _scores(output).detach().float().cpu()
    if pair_scores is not None:  # (B, n_pairs) also when a metric gives (B,) for a single pair
        pair_scores = pair_scores.detach().float().cpu().reshape(scores.shape[0], -1)
    entry = {
        "step": int(step_index),
        "timestep": timestep,
        "scores": scores,
        "pair_scores": pair_scores,
        "pairs": pairs,
    }
    return entry


def _num_steps(pipeline) -> int:
    """Number of denoising-loop iterations of the current call."""
    try:
        return int(pipeline.num_timesteps)
    except (AttributeError, TypeError):
        return len(pipeline.scheduler.timesteps)


def _latent_channels(pipeline) -> int | None:
    vae = getattr(pipeline, "vae", None)
    return None if vae is None else vae.config.get("latent_channels")


def _next_x0_coefficient(pipeline, step_index: int, num_steps: int) -> float:
    """Coefficient of x0 in the latents after this step (their timestep is the loop's next one; 1 after the last)."""
    scheduler = pipeline.scheduler
    timesteps = getattr(scheduler, "timesteps", None)
    if step_index + 1 >= num_steps or timesteps is None or _is_sigma_space(scheduler):
        return 1.0
    # The loop runs over the last `num_steps` scheduler timesteps (img2img-style pipelines skip the first ones).
    offset = len(timesteps) - num_steps
    return float(_sample_coefficients(scheduler, timesteps[offset + step_index + 1])[0][0])
