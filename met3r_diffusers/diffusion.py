"""The diffusion seam: latents -> x0 -> views, shared by the callback, the community pipeline and training.

One path from a pipeline's latents to the metric's views (B, V, 3, H, W):

    x0 = predict_x0(model_output, sample, timesteps, scheduler)    # any scheduler parameterisation
    views = decode_views(vae_or_decode_fn, x0, layout)             # ViewLayout: batch | frames | grid

`predict_x0` covers the three ways diffusers schedulers represent a noisy sample:

* **variance preserving** (DDPM, DDIM, PNDM, DPM-Solver, UniPC, DEIS, LCM, ...):
  `x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps` with `a_t = alphas_cumprod[t]`;
* **sigma space** (Euler, Euler ancestral, Heun, LMS, KDPM2, DPM-Solver SDE; recognised by
  `init_noise_sigma > 1`): `x = x0 + s * eps` with `s = sqrt((1 - a_t) / a_t)`, which is what these
  schedulers hold during sampling and what their `add_noise` returns. The model sees `x / sqrt(s^2 + 1)`
  (`scale_model_input`), i.e. the same sample in variance-preserving form, so both cases share one formula;
* **flow matching** (FlowMatchEulerDiscreteScheduler and other `FlowMatch*` schedulers, or any scheduler with
  `prediction_type="flow_prediction"` / `use_flow_sigmas=True`): `x_t = (1 - s) * x0 + s * eps` with
  `s = t / num_train_timesteps` and velocity `v = eps - x0`, so `x0 = x_t - s * v`.

The noise level is read from the scheduler's *config* (`alphas_cumprod` or `num_train_timesteps`), never
from its sampling state, so the function works the same at training time (integer timesteps) and during
sampling. For a fractional timestep (Euler's default timestep spacing) `s` is interpolated linearly between
the neighbouring integer timesteps, exactly as Euler's `interpolation_type="linear"` does; Karras /
exponential / beta sigma schedules invert their timesteps in log space, so there the estimate differs
slightly from the scheduler's own `pred_original_sample` (the callback uses the scheduler's own value
whenever `step` returns one). Schedulers that round their timesteps to integers (DPM-Solver with flow or
Karras sigmas) are matched to within that rounding. EDM-preconditioned schedulers (`sigma_data` in the config)
are rejected.
"""
from __future__ import annotations

import inspect
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .validation import check_size

Timesteps = Union[int, float, torch.Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
LAYOUT_KINDS = ("batch", "frames", "grid")
# decode_fn(latents (N, C, h, w) or packed latents) -> images (N, 3, H, W) in [-1, 1]
DecodeFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "LAYOUT_KINDS", "PREDICTION_TYPES", "ViewLayout", "decode_latents", "decode_views", "is_flow_matching",
    "is_sigma_space", "predict_x0", "sample_coefficients", "vae_latent_channels", "vae_scale_factor",
]


def is_flow_matching(scheduler) -> bool:
    """Whether `scheduler` uses the rectified-flow parameterisation `x_t = (1 - s) x0 + s eps`."""
    config = scheduler.config
    if config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas", False):
        return True
    return any(cls.__name__.startswith("FlowMatch") for cls in type(scheduler).__mro__)


def is_sigma_space(scheduler) -> bool:
    """Euler-family schedulers keep samples as `x0 + s * eps` (their initial noise has std > 1)."""
    init_noise_sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    return float(init_noise_sigma) > 1.0 + 1e-6


def _per_sample(values: torch.Tensor, batch: int, ndim: int, like: torch.Tensor) -> torch.Tensor:
    """Broadcast scalar or (B,) coefficients to `like`'s shape (B, ...)."""
    values = values.to(device=like.device, dtype=like.dtype).reshape(-1)
    if values.numel() not in (1, batch):
        raise ValueError(f"timesteps must be a scalar or hold one value per sample ({batch}), got {values.numel()}")
    return values.reshape(-1, *([1] * (ndim - 1)))


def _as_tensor(timesteps: Timesteps) -> torch.Tensor:
    if not isinstance(timesteps, torch.Tensor):
        timesteps = torch.tensor(timesteps)
    timesteps = timesteps.detach().to(torch.float64).reshape(-1)
    if not bool(torch.isfinite(timesteps).all()):
        raise ValueError(f"timesteps must be finite, got {timesteps.tolist()}")
    return timesteps


def _vp_alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(a_t), sqrt(1 - a_t)) at possibly fractional timesteps, interpolating s = sqrt((1-a)/a) linearly."""
    alphas_cumprod = alphas_cumprod.detach().to(device=timesteps.device, dtype=torch.float64)
    last = alphas_cumprod.numel() - 1
    if bool(((timesteps < 0) | (timesteps > last)).any()):
        raise ValueError(f"timesteps must lie in [0, {last}], got {timesteps.tolist()}")
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    low = timesteps.floor().long().clamp(max=last)
    high = (low + 1).clamp(max=last)
    frac = timesteps - low
    s = sigmas[low] * (1 - frac) + sigmas[high] * frac
    alpha = (1 + s**2).rsqrt()
    return alpha, s * alpha


def predict_x0(model_output: torch.Tensor, sample: torch.Tensor, timesteps: Timesteps, scheduler) -> torch.Tensor:
    """Estimate the clean sample x0 from a model output, the noisy sample and its timestep(s).

    Args:
        model_output: the denoiser's prediction (noise, velocity, sample or flow), shaped like `sample`.
        sample: the noisy sample `x_t`, shape (B, ...).
        timesteps: the timestep of `sample`, a scalar or a (B,) tensor of (possibly fractional) timesteps.
        scheduler: a diffusers scheduler; its config decides the parameterisation (see the module docstring).
    """
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ in shape")
    config = scheduler.config
    t = _as_tensor(timesteps).to(sample.device)
    batch, ndim = sample.shape[0], sample.ndim

    if is_flow_matching(scheduler):
        sigma = _per_sample(t / config.num_train_timesteps, batch, ndim, sample)
        return sample - sigma * model_output

    if "sigma_data" in config:
        raise ValueError(f"{type(scheduler).__name__} uses EDM preconditioning; use its pred_original_sample")
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"cannot derive x0 for {type(scheduler).__name__}: it has no alphas_cumprod")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES[:3]:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r} for {type(scheduler).__name__}; "
            f"expected one of {PREDICTION_TYPES}"
        )
    if prediction_type == "sample":
        return model_output

    alpha, sigma = _vp_alpha_sigma(scheduler.alphas_cumprod, t)
    alpha = _per_sample(alpha, batch, ndim, sample)
    sigma = _per_sample(sigma, batch, ndim, sample)
    if is_sigma_space(scheduler):
        sample = sample * alpha  # x0 + s*eps  ->  alpha*x0 + sigma*eps
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    return alpha * sample - sigma * model_output  # v_prediction


def sample_coefficients(scheduler, timesteps: Timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with `sample = alpha * x0 + sigma * eps` in the scheduler's sampling space (float64, (T,))."""
    t = _as_tensor(timesteps)
    if is_flow_matching(scheduler):
        sigma = t / scheduler.config.num_train_timesteps
        return 1 - sigma, sigma
    alpha, sigma = _vp_alpha_sigma(scheduler.alphas_cumprod, t)
    if is_sigma_space(scheduler):
        return torch.ones_like(alpha), sigma / alpha
    return alpha, sigma


def vae_scale_factor(vae) -> int:
    """Spatial downsampling factor of a diffusers VAE (8 for Stable Diffusion's)."""
    block_out_channels = vae.config.get("block_out_channels")
    if block_out_channels is None:
        return 8
    return 2 ** (len(block_out_channels) - 1)


def decode_latents(
    vae,
    latents: torch.Tensor,
    size: int | Sequence[int] | None = None,
    num_frames: int | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Decode (N, C, h, w) latents with a diffusers VAE into (N, 3, H, W) images in [-1, 1].

    Honours `vae.config.scaling_factor` and `shift_factor` (`z / scaling_factor + shift_factor`, as the
    pipelines do). `size` (int or (H, W)) asks for images of that pixel size: the latents are resized to
    `size / vae_scale_factor` *before* decoding, which bounds the decoder's cost, and the result is resized
    to `size` exactly. `num_frames` is forwarded to decoders that take it (SVD's temporal decoder).
    Differentiable with respect to `latents` whenever autograd is enabled.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be (N, C, h, w), got shape {tuple(latents.shape)}")
    out_size = None
    if size is not None:
        out_size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        if len(out_size) != 2 or min(out_size) <= 0:
            raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
        factor = vae_scale_factor(vae)
        latent_size = (max(1, round(out_size[0] / factor)), max(1, round(out_size[1] / factor)))
        if latent_size != tuple(latents.shape[-2:]):
            latents = F.interpolate(latents, size=latent_size, mode="bilinear", align_corners=False, antialias=True)

    config = vae.config
    z = latents / config.get("scaling_factor", 1.0)
    shift = config.get("shift_factor")
    if shift is not None:
        z = z + shift
    z = z.to(vae.dtype)

    kwargs = {}
    if num_frames is not None and "num_frames" in inspect.signature(vae.decode).parameters:
        kwargs["num_frames"] = num_frames
    images = vae.decode(z, **kwargs).sample.float()

    if out_size is not None and tuple(images.shape[-2:]) != out_size:
        images = F.interpolate(images, size=out_size, mode="bilinear", align_corners=False, antialias=True)
    return images.clamp(-1, 1) if clamp else images


# ---------------------------------------------------------------------- view layouts


@dataclass(frozen=True)
class ViewLayout:
    """Where the views of one sample live in a pipeline's latents (and decoded images).

    * `"batch"`: `V` consecutive batch entries are the views of one sample (`num_images_per_prompt=V`,
      MVDream / MV-Adapter style); latents `(B*V, C, h, w)`. `num_views=None` means the whole batch is one sample.
    * `"frames"`: video latents, frames are views; `(B, F, C, h, w)` (SVD, CogVideoX; `frame_dim=1`) or
      `(B, C, F, h, w)` (AnimateDiff, Wan; `frame_dim=2`). `frame_dim=None` picks the axis that is not the
      latent channel axis when `latent_channels` is passed, else 1. `num_views < F` scores `num_views` evenly
      spaced frames (only those are decoded).
    * `"grid"`: `rows x cols` views tiled row-major in one image (Zero123++'s 3x2 grid); latents `(B, C, h, w)`
      are decoded whole and the decoded image is cut into tiles. `num_views < rows*cols` keeps the first ones.

    `batch` and `grid` pass latents of any shape through `to_decode` (packed Flux-style latents included, for a
    custom decoder); `frames` needs 5-D latents.

    Strings are accepted where a layout is expected: `"batch"`, `"frames"`, `"frames:bfchw"`, `"frames:bcfhw"`,
    `"grid:RxC"` (e.g. `"grid:3x2"`).
    """

    kind: str = "batch"
    num_views: int | None = None
    frame_dim: int | None = None
    grid: tuple[int, int] | None = None

    def __post_init__(self):
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"layout must be one of {LAYOUT_KINDS}, got {self.kind!r}")
        if self.num_views is not None and (
            isinstance(self.num_views, bool) or not isinstance(self.num_views, numbers.Integral) or self.num_views < 2
        ):
            raise ValueError(f"num_views must be an integer of at least 2 (or None), got {self.num_views!r}")
        if self.frame_dim not in (None, 1, 2):
            raise ValueError(f"frame_dim must be 1 (B,F,C,h,w) or 2 (B,C,F,h,w), got {self.frame_dim}")
        if self.kind == "grid":
            if (self.grid is None or len(self.grid) != 2 or not all(
                    isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in self.grid)
                    or min(self.grid) < 1 or self.grid[0] * self.grid[1] < 2):
                raise ValueError(f"grid layout needs grid=(rows, cols) with at least 2 tiles, got {self.grid!r}")
            if self.num_views is not None and self.num_views > self.grid[0] * self.grid[1]:
                raise ValueError(f"num_views={self.num_views} exceeds the {self.grid[0]}x{self.grid[1]} grid")

    @classmethod
    def parse(cls, layout: str | ViewLayout, num_views: int | None = None) -> ViewLayout:
        """Build a layout from a string shortcut (or return a given layout, with `num_views` filled in)."""
        if isinstance(layout, ViewLayout):
            if num_views is None or layout.num_views == num_views:
                return layout
            return cls(layout.kind, num_views, layout.frame_dim, layout.grid)
        if not isinstance(layout, str):
            raise TypeError(f"layout must be a string or a ViewLayout, got {type(layout).__name__}")
        kind, _, option = layout.partition(":")
        if kind == "frames" and option:
            dims = {"bfchw": 1, "bcfhw": 2}
            if option not in dims:
                raise ValueError(f"layout {layout!r}: frames option must be one of {tuple(dims)}")
            return cls(kind, num_views, frame_dim=dims[option])
        if kind == "grid":
            rows, _, cols = option.partition("x")
            if not (rows.isdigit() and cols.isdigit()):
                raise ValueError(f"layout {layout!r}: grid layouts are written 'grid:RxC', e.g. 'grid:3x2'")
            return cls(kind, num_views, grid=(int(rows), int(cols)))
        if option:
            raise ValueError(f"layout {layout!r} takes no option")
        return cls(kind, num_views)

    def _frame_dim(self, latents: torch.Tensor, latent_channels: int | None) -> int:
        if self.frame_dim is not None:
            return self.frame_dim
        if latent_channels is not None:
            matches = [d for d in (1, 2) if latents.shape[d] != latent_channels]
            if len(matches) == 1:
                return matches[0]
        return 1

    def _frame_indices(self, num_frames: int) -> torch.Tensor:
        if self.num_views is None or self.num_views == num_frames:
            return torch.arange(num_frames)
        if self.num_views > num_frames:
            raise ValueError(f"num_views={self.num_views} exceeds the {num_frames} frames of the latents")
        return torch.linspace(0, num_frames - 1, self.num_views).round().long()

    def to_decode(self, latents: torch.Tensor, latent_channels: int | None = None) -> tuple[torch.Tensor, int]:
        """Latents to decode, (N, C, h, w), and the number of samples B (differentiable reshapes only)."""
        if self.kind == "frames":
            if latents.ndim != 5:
                raise ValueError(f"frames layout expects 5-D video latents, got shape {tuple(latents.shape)}")
            frame_dim = self._frame_dim(latents, latent_channels)
            if frame_dim == 2:
                latents = latents.transpose(1, 2)
            latents = latents[:, self._frame_indices(latents.shape[1]).to(latents.device)]
            return latents.flatten(0, 1), latents.shape[0]
        # batch / grid: (N, C, h, w), or packed (N, L, D) latents left to a custom decode_fn
        if self.kind == "grid":
            return latents, latents.shape[0]
        views = latents.shape[0] if self.num_views is None else self.num_views
        if latents.shape[0] % views:
            raise ValueError(f"batch of {latents.shape[0]} latents is not a multiple of num_views={views}")
        return latents, latents.shape[0] // views

    def to_views(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Decoded images (N, 3, H, W) from `to_decode`'s latents -> views (B, V, 3, H, W)."""
        if self.kind != "grid":
            return images.reshape(batch_size, -1, *images.shape[1:])
        rows, cols = self.grid
        n, c, height, width = images.shape
        if height % rows or width % cols:
            raise ValueError(f"decoded image {height}x{width} does not split into a {rows}x{cols} grid")
        tiles = images.reshape(n, c, rows, height // rows, cols, width // cols).permute(0, 2, 4, 1, 3, 5)
        tiles = tiles.reshape(n, rows * cols, c, height // rows, width // cols)
        return tiles if self.num_views is None else tiles[:, : self.num_views]


# ---------------------------------------------------------------------- latents -> views


def vae_latent_channels(vae: Any) -> int | None:
    """The latent channel count in a diffusers VAE's config (None for a decode function or a config without it)."""
    config = getattr(vae, "config", None)
    return None if config is None else config.get("latent_channels")


def _view_size(size: int | Sequence[int] | None, layout: ViewLayout) -> tuple[int, int] | None:
    """Pixel size of the decoded *image* for a per-view `size` (a grid image holds rows x cols views)."""
    if size is None:
        return None
    out = check_size("size", size)
    if layout.kind == "grid":
        rows, cols = layout.grid
        out = (out[0] * rows, out[1] * cols)
    return out


def decode_views(
    decoder: Any,
    latents: torch.Tensor,
    layout: str | ViewLayout | int = "batch",
    size: int | Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
    *,
    latent_channels: int | None = None,
    num_views: int | None = None,
) -> torch.Tensor:
    """Decode a pipeline's latents (or x0 estimates) into views (B, V, 3, H, W) in [-1, 1]: the one latents -> views path.

    Args:
        decoder: a diffusers VAE (`decode_latents` applies its scaling/shift factors) or a function
            `decode_fn(latents) -> images (N, 3, H, W)` that gets the layout's latents to decode
            (`(N, C, h, w)`, or packed latents unchanged for the batch / grid layouts).
        latents: in the pipeline's layout, see `ViewLayout`.
        layout: a `ViewLayout`, its string form ("batch", "frames:bcfhw", "grid:3x2", ...) or an int V
            (batch layout with V views per sample).
        size: pixel size (int or (H, W)) of each *view*; a VAE decodes downscaled latents (bounding its cost),
            a decode function decodes at its own size and its output is resized.
        gradient_checkpointing: recompute the decoder in the backward pass instead of storing its activations.
        latent_channels: the latents' channel count, which tells the frame axis of "frames" latents apart; read
            from a VAE's config, so pass it with a decode function (e.g. the pipeline VAE's).
        num_views: deprecated (the 0.1 keyword of `loss.decode_views`): views per sample of the layout.
    """
    if num_views is not None:
        warnings.warn("decode_views(num_views=V) is deprecated: pass layout=V or ViewLayout(...)", FutureWarning,
                      stacklevel=2)
    if isinstance(layout, int) and not isinstance(layout, bool):
        layout = ViewLayout("batch", layout)
    layout = ViewLayout.parse(layout, num_views)
    image_size = _view_size(size, layout)
    channels = latent_channels if latent_channels is not None else vae_latent_channels(decoder)
    to_decode, batch_size = layout.to_decode(latents, channels)
    num_frames = to_decode.shape[0] // batch_size if layout.kind == "frames" else None

    def decode(z: torch.Tensor) -> torch.Tensor:
        if hasattr(decoder, "decode") and hasattr(decoder, "config"):
            return decode_latents(decoder, z, size=image_size, num_frames=num_frames)
        if not callable(decoder):
            raise TypeError(f"decoder must be a diffusers VAE or a callable, got {type(decoder).__name__}")
        images = decoder(z)
        if image_size is not None and tuple(images.shape[-2:]) != image_size:
            images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False, antialias=True)
        return images

    if gradient_checkpointing and torch.is_grad_enabled():
        images = checkpoint(decode, to_decode, use_reentrant=False)
    else:
        images = decode(to_decode)
    return layout.to_views(images, batch_size)
