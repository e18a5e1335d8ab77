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
model output and the scheduler's x0 estimate (`return_dict=False`). A `SchedulerTap` therefore wraps
`pipeline.scheduler.step` (an instance attribute shadowing the class method), once per scheduler however many
callbacks use it: the wrapper binds the arguments against the scheduler class's own `step` signature, calls the
step with `return_dict=True`, records `pred_original_sample` (or LCM's `denoised`) when the scheduler returns one
and otherwise derives x0 from the model output with `predict_x0`, hands the record to every subscribed callback,
and returns exactly what the pipeline asked for, so sampling is bit-identical. A callback subscribes in
`attach(pipe)` or, failing that, on its first call -- which comes *after* step 0's scheduler step, so an unattached
callback cannot score step 0 (it warns once). It unsubscribes after the final step, by `close()`, or on leaving
the outermost `with callback.attach(pipe):` block (also when the pipeline raises); the wrapper is removed when
its last subscriber leaves, in any order, and closing twice is harmless.

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
`guidance_scale` per step. Pairs without overlap must not poison the latents: the
objective is `loss.guidance_objective` (the metric's NaN-free scores, `empty="zero"`, as in `MEt3RLoss`: such pairs
contribute nothing) and the step direction `loss.guidance_direction` (non-finite samples zeroed -- with a
warning here -- then per-sample normalisation and clipping), the same two functions the community pipeline uses.
Randomness: the callback draws no random numbers itself.
"""
from __future__ import annotations

import inspect
import math
import warnings
import weakref
from typing import Any, Callable

import torch
from diffusers.callbacks import PipelineCallback
from typing_extensions import Self

from . import functional
from .diffusion import (
    DecodeFn,
    ViewLayout,
    decode_views,
    is_sigma_space,
    predict_x0,
    sample_coefficients,
    vae_latent_channels,
)
from .loss import MEt3RLoss, call_metric, guidance_direction, guidance_objective
from .pairs import PairSpec, resolve_pairs
from .validation import check_finite, check_positive_int, check_size

__all__ = ["MEt3RCallback", "SchedulerTap"]


class SchedulerTap:
    """Records every `scheduler.step`'s x0 estimate and timestep for the callbacks subscribed to it.

    One tap per scheduler (`SchedulerTap.of(scheduler)`), installed as an instance attribute `step` that shadows
    the class's method and removed when the last subscriber unsubscribes. The scheduler's outputs are unchanged.
    A tap left behind (its callbacks garbage-collected, or a run that stopped before its final step) removes
    itself at its next step; a copied or unpickled scheduler gets such a subscriber-less tap, so the copy steps
    itself and is clean after one step.
    """

    _taps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, scheduler: Any):
        # weak references both ways: a tap keeps neither its scheduler nor its subscribers alive
        self._scheduler = weakref.ref(scheduler)
        self.records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # subscriber -> latest record
        self._previous = scheduler.__dict__.get("step")  # a foreign instance-level wrapper, kept and restored
        # bind against the class's own method: another wrapper's (*args, **kwargs) would hide the names
        self._signature = inspect.signature(type(scheduler).step.__get__(scheduler))
        self._supports_return_dict = "return_dict" in self._signature.parameters

    @property
    def scheduler(self) -> Any:
        """The tapped scheduler (None once it has been garbage-collected)."""
        return self._scheduler()

    @classmethod
    def of(cls, scheduler: Any) -> SchedulerTap:
        """The tap of `scheduler`, installing one if it has none."""
        tap = cls._taps.get(scheduler)
        if tap is None:
            tap = cls(scheduler)
            scheduler.step = tap.step
            cls._taps[scheduler] = tap
        return tap

    def subscribe(self, subscriber: object) -> None:
        """Start recording for `subscriber` (its record starts empty)."""
        self.records[subscriber] = None

    def __reduce__(self) -> tuple:
        # copy.deepcopy / pickle of a tapped scheduler: the copy gets a fresh tap of its own, without subscribers
        return (_untapped_copy, (self.scheduler,))

    def unsubscribe(self, subscriber: object) -> None:
        """Stop recording for `subscriber`; the last one out removes the wrapper (unless another was put over it)."""
        self.records.pop(subscriber, None)
        if not self.records:
            self._remove()

    def _remove(self) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        if self._taps.get(scheduler) is self:
            del self._taps[scheduler]
        if scheduler.__dict__.get("step") != self.step:
            return  # someone wrapped the step after us: leave their wrapper (it reaches ours, now a pass-through)
        if self._previous is None:
            scheduler.__dict__.pop("step", None)
        else:
            scheduler.step = self._previous

    def pop(self, subscriber: object) -> tuple[torch.Tensor, Any] | None:
        """`subscriber`'s latest (x0, timestep) record, cleared so that it is used once."""
        record = self.records.get(subscriber)
        if subscriber in self.records:
            self.records[subscriber] = None
        return record

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """The scheduler's step, returning what the caller asked for, with its x0 estimate recorded."""
        scheduler = self.scheduler
        original = self._previous if self._previous is not None else type(scheduler).step.__get__(scheduler)
        if not self.records:  # left behind: step plainly and take the wrapper away
            self._remove()
            return original(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        return_dict = bound.arguments.get("return_dict", True)
        if self._supports_return_dict:
            bound.arguments["return_dict"] = True
        output = original(*bound.args, **bound.kwargs)
        timestep = bound.arguments["timestep"]
        x0 = None
        if not isinstance(output, tuple):
            x0 = getattr(output, "pred_original_sample", None)
            if x0 is None:
                x0 = getattr(output, "denoised", None)
        if x0 is None:
            x0 = predict_x0(bound.arguments["model_output"], bound.arguments["sample"], timestep, scheduler)
        record = (x0.detach(), timestep)
        for key in self.records:
            self.records[key] = record
        if self._supports_return_dict and not return_dict:
            return output.to_tuple()
        return output


def _untapped_copy(scheduler: Any) -> SchedulerTap:
    """The tap of a copied / unpickled tapped scheduler: one without subscribers (see SchedulerTap)."""
    return SchedulerTap(scheduler)


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
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        windows = {"start/stop": (start, stop), "guidance_start/guidance_stop": (guidance_start, guidance_stop)}
        for name, (low, high) in windows.items():
            low, high = check_finite(name, low), check_finite(name, high)
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 <= start <= stop <= 1, got ({low}, {high})")
        self.guidance_scale = check_finite("guidance_scale", guidance_scale, minimum=0)
        self.max_grad_norm = check_finite("max_grad_norm", max_grad_norm, positive=True, optional=True)
        self.layout = ViewLayout.parse(layout, num_views)
        # pairs are checked now, not at the first step: against num_views when it is known, else their form
        resolve_pairs(pairs, self.layout.num_views or (2 if isinstance(pairs, str) or pairs is None else 2**31))
        decode_size = check_size("decode_size", decode_size)
        self.metric = metric
        self.pairs = pairs
        self.window = (float(start), float(stop))
        self.guidance_window = (float(guidance_start), float(guidance_stop))
        self.decode_size = decode_size
        self.decode_fn = decode_fn
        self.normalize_grad = normalize_grad
        self.history: list[dict[str, Any]] = []
        self._tap: SchedulerTap | None = None
        self._attach_depth = 0  # nested `with callback.attach(pipe):` blocks
        self._warned_missing = False
        self._warned_nonfinite = False

    # ------------------------------------------------------------------ scheduler tap

    def attach(self, pipeline) -> MEt3RCallback:
        """Subscribe to `pipeline.scheduler`'s step tap now (so that step 0 can be scored).

        Use as `with callback.attach(pipe):`; nested blocks on the same pipeline leave the callback attached until
        the outermost one ends.
        """
        self._subscribe(pipeline.scheduler)
        self._attach_depth += 1
        return self

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle) starts detached: the tap belongs to the original's subscription
        state = self.__dict__.copy()
        state.update(_tap=None, _attach_depth=0)
        return state

    def _subscribe(self, scheduler: Any) -> None:
        if self._tap is not None and self._tap.scheduler is scheduler and self in self._tap.records:
            return
        self._unsubscribe()
        self._tap = SchedulerTap.of(scheduler)
        self._tap.subscribe(self)

    def _unsubscribe(self) -> None:
        if self._tap is not None:
            self._tap.unsubscribe(self)
        self._tap = None

    def close(self) -> None:
        """Unsubscribe from the scheduler tap (idempotent); the tap is removed when no callback uses it."""
        self._attach_depth = 0
        self._unsubscribe()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self._attach_depth = max(self._attach_depth - 1, 0)
        if self._attach_depth == 0:
            self._unsubscribe()

    # ------------------------------------------------------------------ callback

    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Score (and guide) at this step; returns the (possibly updated) callback tensors."""
        self._subscribe(pipeline.scheduler)
        num_steps = _num_steps(pipeline)
        is_final = step_index >= num_steps - 1
        record = self._tap.pop(self)

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
                views, output, direction = self._score_and_direction(pipeline, x0)
                latents = callback_kwargs["latents"]
                coefficient = _next_x0_coefficient(pipeline, step_index, num_steps)
                callback_kwargs["latents"] = latents - (coefficient * self.guidance_scale) * direction.to(latents.dtype)
            else:
                with torch.no_grad():
                    views = self._views(pipeline, x0)
                    output = call_metric(self.metric, views, self.pairs)
            if score_now:
                pairs = resolve_pairs(self.pairs, views.shape[1])
                self.history.append(_history_entry(step_index, timestep, output, pairs))
            return callback_kwargs
        finally:
            if is_final and self._attach_depth == 0:  # auto-attached: done; attached: until its block ends
                self._unsubscribe()

    @staticmethod
    def _in_window(step_index: int, num_steps: int, window: tuple[float, float]) -> bool:
        return window[0] * num_steps <= step_index < window[1] * num_steps

    def _views(self, pipeline, x0: torch.Tensor) -> torch.Tensor:
        """x0 (pipeline layout) -> views (B, V, 3, H, W), through the one latents -> views path."""
        vae = getattr(pipeline, "vae", None)
        decoder = self.decode_fn if self.decode_fn is not None else vae
        return decode_views(decoder, x0, self.layout, size=self.decode_size, latent_channels=vae_latent_channels(vae))

    def _score_and_direction(self, pipeline, x0: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """The views, the metric's output and the per-sample step direction d(objective)/d(x0)."""
        with torch.enable_grad():
            x0 = x0.detach().float().requires_grad_(True)
            views = self._views(pipeline, x0)
            output, objective = guidance_objective(self.metric, views, self.pairs)
            (grad,) = torch.autograd.grad(objective.sum(), x0)
        direction, num_bad = guidance_direction(grad, views.shape[0], self.normalize_grad, self.max_grad_norm)
        if num_bad and not self._warned_nonfinite:
            warnings.warn(
                f"MEt3RCallback: the metric's gradient is not finite for {num_bad} sample(s) (pairs without overlap "
                "scored NaN?); those samples are not guided at this step",
                stacklevel=3,
            )
            self._warned_nonfinite = True
        return views.detach(), output, direction

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
        valid = getattr(output, "valid", None)
        if valid is not None:  # guidance scored NaN-free (empty="zero"): the history reports MEt3R's NaN
            valid = valid.cpu().reshape(pair_scores.shape)
            pair_scores = torch.where(valid, pair_scores, torch.full_like(pair_scores, math.nan))
            scores = functional.sample_scores(pair_scores, valid, empty="nan")
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


def _next_x0_coefficient(pipeline, step_index: int, num_steps: int) -> float:
    """Coefficient of x0 in the latents after this step (their timestep is the loop's next one; 1 after the last)."""
    scheduler = pipeline.scheduler
    timesteps = getattr(scheduler, "timesteps", None)
    if step_index + 1 >= num_steps or timesteps is None or is_sigma_space(scheduler):
        return 1.0
    # The loop runs over the last `num_steps` scheduler timesteps (img2img-style pipelines skip the first ones).
    offset = len(timesteps) - num_steps
    return float(sample_coefficients(scheduler, timesteps[offset + step_index + 1])[0][0])


def __getattr__(name: str) -> Any:
    # guidance_scores / zero_nonfinite_samples moved to met3r_diffusers.loss (guidance_objective / guidance_direction)
    if name in ("guidance_scores", "zero_nonfinite_samples"):
        warnings.warn(
            f"met3r_diffusers.callbacks.{name} is deprecated: use met3r_diffusers.loss.guidance_objective / "
            "guidance_direction", FutureWarning, stacklevel=2,
        )
        return _DEPRECATED[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _zero_nonfinite_samples(grad: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, int]:
    direction, num_bad = guidance_direction(grad, num_samples, normalize=False)
    return direction.reshape(num_samples, -1), num_bad


_DEPRECATED = {"guidance_scores": guidance_objective, "zero_nonfinite_samples": _zero_nonfinite_samples}
