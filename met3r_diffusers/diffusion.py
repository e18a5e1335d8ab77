"""Diffusion helpers shared by the callback, the community pipelines and training: x0 estimates and decoding.

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
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F

Timesteps = Union[int, float, torch.Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def is_flow_matching(scheduler) -> bool:
    """Whether `scheduler` uses the rectified-flow parameterisation `x_t = (1 - s) x0 + s eps`."""
    config = scheduler.config
    if config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas", False):
        return True
    return any(cls.__name__.startswith("FlowMatch") for cls in type(scheduler).__mro__)


def _is_sigma_space(scheduler) -> bool:
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
    return timesteps.detach().to(torch.float64).reshape(-1)


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
    if _is_sigma_space(scheduler):
        sample = sample * alpha  # x0 + s*eps  ->  alpha*x0 + sigma*eps
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    return alpha * sample - sigma * model_output  # v_prediction


def _sample_coefficients(scheduler, timesteps: Timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with `sample = alpha * x0 + sigma * eps` in the scheduler's sampling space (float64, (T,))."""
    t = _as_tensor(timesteps)
    if is_flow_matching(scheduler):
        sigma = t / scheduler.config.num_train_timesteps
        return 1 - sigma, sigma
    alpha, sigma = _vp_alpha_sigma(scheduler.alphas_cumprod, t)
    if _is_sigma_space(scheduler):
        return torch.ones_like(alpha), sigma / alpha
    return alpha, sigma


def _vae_scale_factor(vae) -> int:
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
        factor = _vae_scale_factor(vae)
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
