"""MEt3R-guided multi-view sampling: a single-file diffusers community pipeline.

For multi-view UNets whose views are consecutive batch entries (MVDream / MV-Adapter style, or a plain
`UNet2DConditionModel` with `num_views` images per sample). Inside the guidance window each step is classifier
guidance with MEt3R as the (negative log-)classifier, computed exactly rather than approximated:

    x0(x_t)   = predict_x0(unet(x_t), x_t, t)                 differentiable through the UNet
    g         = d/dx_t  sum_b MEt3R(decode(x0(x_t))_b)         through the decoder and the UNet
    eps'      = eps + scale * sigma_t * g                     (Dhariwal & Nichol's classifier guidance, with
                                                               log p(consistent | x_t) = -MEt3R)

where `x_t = alpha_t * x0 + sigma_t * eps` in the scheduler's sampling space (variance preserving, Euler sigma
space or flow matching). The corrected prediction is converted back to the scheduler's prediction type
(epsilon / v / sample / flow) *before* the scheduler step, so every scheduler, multistep ones included, sees a
consistent model output. For flow matching at sigma = 1 (alpha = 0) the conversion is singular: alpha is clamped
to 1e-3 there, so start the guidance window after the first step.

Load it by path (or build it from components):

```python
pipe = DiffusionPipeline.from_pretrained(model_dir, custom_pipeline="pipelines/met3r_guided_multiview.py")
out = pipe("a wooden chair", num_views=4, metric=MEt3R(...), met3r_guidance_scale=50.0, met3r_decode_size=128,
           gradient_checkpointing=True)
out.images        # B * num_views images, the views of each sample consecutive
out.met3r_scores  # [{"step", "timestep", "scores" (B,)}] at every guided step
```

Memory: the gradient needs the UNet's and the decoder's activations. `gradient_checkpointing=True` recomputes them
in the backward pass instead of storing them; `met3r_decode_size` decodes the x0 estimate at a reduced size
(latents are downscaled first); `met3r_every_n_steps` guides only every N-th step.

Pairs without overlap: with a metric that returns its score map and overlap mask (`MEt3R`) the guided objective
ignores them (no NaN gradient; see `met3r_diffusers.loss.guidance_objective`); with other metrics a sample whose
gradient is not finite is left unguided at that step.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from met3r_diffusers.diffusion import (
    ViewLayout,
    decode_latents,
    decode_views,
    is_flow_matching,
    predict_x0,
    sample_coefficients,
)
from met3r_diffusers.loss import guidance_direction, guidance_objective
from met3r_diffusers.pairs import resolve_pairs
from met3r_diffusers.validation import check_finite, check_positive_int


@dataclass
class MEt3RMultiViewPipelineOutput(BaseOutput):
    """Generated views (`B * num_views`, each sample's views consecutive) and MEt3R scores at the guided steps."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    met3r_scores: list[dict[str, Any]]


class MEt3RGuidedMultiViewPipeline(DiffusionPipeline):
    """Text-to-multi-view sampling with exact MEt3R classifier guidance (views = consecutive batch entries)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components: ClassVar[list[str]] = []
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def _encode_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP text embeddings (N, L, D) for a list of prompts."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(device))[0]

    def _model_output(self, latents, t, embeds, guidance_scale, cross_attention_kwargs, unet_kwargs):
        """The UNet's (classifier-free guided) prediction for `latents` at timestep `t`."""
        do_cfg = guidance_scale > 1.0
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        if hasattr(self.scheduler, "scale_model_input"):
            model_input = self.scheduler.scale_model_input(model_input, t)
        output = self.unet(
            model_input,
            t,
            encoder_hidden_states=embeds,
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=False,
            **(unet_kwargs or {}),
        )[0]
        if do_cfg:
            uncond, cond = output.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        return output

    def _guided_output(self, model_output: torch.Tensor, grad: torch.Tensor, t, scale: float) -> torch.Tensor:
        """Model output after classifier guidance eps' = eps + scale * sigma_t * grad, in the scheduler's type."""
        alpha, sigma = (float(c[0]) for c in sample_coefficients(self.scheduler, t))
        alpha = max(alpha, 1e-3)
        d_eps = (scale * sigma) * grad
        d_x0 = (-sigma / alpha) * d_eps  # x0 = (x_t - sigma * eps) / alpha
        if is_flow_matching(self.scheduler):
            return model_output + (d_eps - d_x0)  # velocity = eps - x0
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return model_output + d_eps
        if prediction_type == "sample":
            return model_output + d_x0
        if prediction_type == "v_prediction":  # v = alpha_vp * eps - sigma_vp * x0, normalised to VP coefficients
            return model_output + (alpha * d_eps - sigma * d_x0) / (alpha**2 + sigma**2) ** 0.5
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")

    def _set_gradient_checkpointing(self, enabled: bool) -> list:
        """Switch gradient checkpointing on the UNet and VAE; returns the previous states to restore."""
        previous = []
        for model in (self.unet, self.vae):
            state = getattr(model, "is_gradient_checkpointing", False)
            previous.append((model, state))
            if enabled and not state and getattr(model, "_supports_gradient_checkpointing", False):
                model.enable_gradient_checkpointing()
        return previous

    def _step_kwargs(self, generator, eta: float) -> dict:
        parameters = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in parameters:
            kwargs["eta"] = eta
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_views: int = 4,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_samples_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        metric: Callable[..., Any] | None = None,
        met3r_guidance_scale: float = 0.0,
        met3r_pairs: str | list = "adjacent",
        met3r_guidance_start: float = 0.0,
        met3r_guidance_stop: float = 1.0,
        met3r_every_n_steps: int = 1,
        met3r_decode_size: int | tuple[int, int] | None = None,
        met3r_max_grad_norm: float | None = None,
        gradient_checkpointing: bool = False,
        cross_attention_kwargs: dict[str, Any] | None = None,
        unet_kwargs: dict[str, Any] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Sample `num_views` views per sample, guided towards 3D consistency by MEt3R's gradient.

        Args (beyond Stable Diffusion's):
            num_views: views per sample, generated as consecutive batch entries.
            prompt_embeds / negative_prompt_embeds: one entry per view, (B * num_views, L, D).
            metric: `metric(views (B, V, 3, H, W) in [-1, 1], pairs=...)` with `.score` (B,), e.g. `MEt3R`.
            met3r_guidance_scale: classifier-guidance scale (0 = unguided).
            met3r_pairs: view pairs scored by the metric.
            met3r_guidance_start / met3r_guidance_stop: guidance window as fractions of the steps.
            met3r_every_n_steps: guide only every N-th step inside the window.
            met3r_decode_size: pixel size of each decoded view for the metric (latents are downscaled first).
            met3r_max_grad_norm: optional cap on the per-sample RMS of the MEt3R gradient.
            gradient_checkpointing: recompute UNet / VAE activations in the backward pass (saves memory).
            unet_kwargs: extra keyword arguments for the UNet (camera embeddings of multi-view UNets, ...).
        """
        if check_positive_int("num_views", num_views) < 2:
            raise ValueError(f"num_views must be at least 2, got {num_views}")
        met3r_guidance_scale = check_finite("met3r_guidance_scale", met3r_guidance_scale, minimum=0)
        met3r_max_grad_norm = check_finite("met3r_max_grad_norm", met3r_max_grad_norm, positive=True, optional=True)
        check_finite("guidance_scale", guidance_scale)
        if met3r_guidance_scale > 0 and metric is None:
            raise ValueError("met3r_guidance_scale > 0 needs a metric")
        window = (check_finite("met3r_guidance_start", met3r_guidance_start),
                  check_finite("met3r_guidance_stop", met3r_guidance_stop))
        if not 0.0 <= window[0] <= window[1] <= 1.0:
            raise ValueError("met3r_guidance_start/stop must satisfy 0 <= start <= stop <= 1")
        check_positive_int("met3r_every_n_steps", met3r_every_n_steps)
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if any(name not in self._callback_tensor_inputs for name in tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}")
        if met3r_guidance_scale > 0:
            resolve_pairs(met3r_pairs, num_views)  # validate early

        device = self._execution_device
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        do_cfg = guidance_scale > 1.0

        # 1. prompts -> per-view embeddings (B*V, L, D)
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negatives = negative_prompt or ""
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
            repeat = num_samples_per_prompt * num_views
            prompt_embeds = self._encode_text(prompts, device).repeat_interleave(repeat, dim=0)
            if do_cfg and negative_prompt_embeds is None:
                negative_prompt_embeds = self._encode_text(negatives, device).repeat_interleave(repeat, dim=0)
        if prompt_embeds.shape[0] % num_views:
            raise ValueError(f"prompt_embeds must hold one entry per view: {prompt_embeds.shape[0]} is not a "
                             f"multiple of num_views={num_views}")
        num_samples = prompt_embeds.shape[0] // num_views
        if do_cfg:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self._encode_text([""], device).expand_as(prompt_embeds)
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError("negative_prompt_embeds must have the shape of prompt_embeds")
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.unet.dtype)

        # 2. timesteps and initial noise
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (
            num_samples * num_views,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)
        self._num_timesteps = len(timesteps)

        # 3. denoising loop
        history = []
        restore = self._set_gradient_checkpointing(gradient_checkpointing)
        try:
            for i, t in enumerate(self.progress_bar(timesteps)):
                guide = (
                    met3r_guidance_scale > 0
                    and met3r_guidance_start * len(timesteps) <= i < met3r_guidance_stop * len(timesteps)
                    and i % met3r_every_n_steps == 0
                )
                with torch.set_grad_enabled(guide):
                    x_t = latents.detach().requires_grad_(guide)
                    model_output = self._model_output(
                        x_t, t, prompt_embeds, guidance_scale, cross_attention_kwargs, unet_kwargs
                    )
                    if guide:
                        x0 = predict_x0(model_output, x_t, t, self.scheduler)
                        views = decode_views(self.vae, x0, ViewLayout("batch", num_views), size=met3r_decode_size)
                        output, objective = guidance_objective(metric, views, met3r_pairs)
                        (grad,) = torch.autograd.grad(objective.sum(), x_t)
                        scores = output.score if hasattr(output, "score") else output
                        history.append({"step": i, "timestep": t.item(), "scores": scores.detach().float().cpu()})
                model_output = model_output.detach()
                if guide:
                    # NaN rows (no guidance for that sample) and the RMS cap per sample, as MEt3RCallback does
                    grad, _ = guidance_direction(grad, num_samples, normalize=False, max_norm=met3r_max_grad_norm)
                    model_output = self._guided_output(model_output, grad, t, met3r_guidance_scale)
                latents = self.scheduler.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {"latents": latents}  # the only entry of _callback_tensor_inputs
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
        finally:
            for model, state in restore:
                if not state and getattr(model, "is_gradient_checkpointing", False):
                    model.disable_gradient_checkpointing()

        # 4. decode
        if output_type == "latent":
            images = latents
        else:
            images = decode_latents(self.vae, latents)
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, history
        return MEt3RMultiViewPipelineOutput(images=images, met3r_scores=history)
