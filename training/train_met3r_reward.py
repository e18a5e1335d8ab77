#!/usr/bin/env python
"""Reward fine-tuning of a multi-view diffusion UNet with MEt3R: truncated backprop through the sampler (DRaFT-K).

Each step samples the `--num_views` views of a batch of prompts (batch-as-views layout, MVDream / MV-Adapter style)
with DDIM for `--num_inference_steps` steps and classifier-free guidance (`--cfg_scale`), keeping the autograd graph
only for the last `--truncation_steps` K denoiser calls (the earlier ones run under no_grad; each kept call is
recomputed in the backward pass, gradient checkpointing). The final latents are decoded by the VAE (checkpointed,
optionally at `--reward_resolution`) and scored:

    loss = -reward + kl_weight * KL + diffusion_loss_weight * diffusion loss on real multi-view data,
    reward = -MEt3R (mean over the pairs that overlap; pairs without overlap contribute nothing),
    KL = mean squared distance between the fine-tuned and the frozen base model's guided predictions at the K kept
         calls of the sampled trajectory (0 at the first step).

The two guards fight reward hacking (the metric can be lowered by flattening or tinting the images); the per-view
contrast, saturation and mean colour are logged next to the reward so that such a collapse is visible.

    accelerate launch training/train_met3r_reward.py \
      --pretrained_model_name_or_path path/to/multiview-model --train_data_dir data/scenes --num_views 4 \
      --use_lora --truncation_steps 2 --kl_weight 0.1 --diffusion_loss_weight 1.0 --output_dir runs/met3r-reward

`--tiny_test_model` replaces the pretrained components by tiny randomly initialised ones (no download). See
docs/training.md ("Reward fine-tuning") for every option.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from met3r_diffusers.data import PROMPT_FILE, MultiViewFolderDataset, collate_multiview
from met3r_diffusers.diffusion import ViewLayout, decode_views, vae_scale_factor
from met3r_diffusers.evaluation import MEt3REvalHook
from met3r_diffusers.rewards import MEt3RReward, image_statistics
from met3r_diffusers.testing import tiny_training_components
from met3r_diffusers.training_utils import (
    PREDICTION_TYPES,
    add_metric_arguments,
    add_model_arguments,
    add_optimisation_arguments,
    add_tracking_arguments,
    check_resolution,
    epoch_batches,
    find_checkpoint,
    finish_training,
    init_trackers,
    load_checkpoint,
    load_metric,
    load_pretrained_components,
    make_accelerator,
    make_optimizer,
    prepare_components,
    run_validation,
    save_checkpoint,
    text_embeddings,
    validate_training_args,
    view_labels,
)

logger = get_logger(__name__)
# what this script writes into its checkpoints, so that the other training script refuses to resume them
CHECKPOINT_KIND = "train_met3r_reward"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Command line of the script (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)

    data = parser.add_argument_group("prompts and data")
    data.add_argument("--prompts_file", type=str, default=None,
                      help="text file, one prompt a line (default: the prompt.txt of the --train_data_dir scenes)")
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="folder of scene folders (see data.py): prompts and the data of --diffusion_loss_weight")
    data.add_argument("--num_views", type=int, default=None, help="views per sample (default: the dataset's)")
    data.add_argument("--resolution", type=int, default=None,
                      help="image size of the samples (default: the dataset's, or the UNet's sample_size)")
    data.add_argument("--train_batch_size", type=int, default=1, help="prompts (and real scenes) per device batch")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num_inference_steps", type=int, default=20, help="DDIM steps per sample")
    sampling.add_argument("--cfg_scale", type=float, default=3.0, help="classifier-free guidance scale (1: none)")
    sampling.add_argument("--truncation_steps", type=int, default=1,
                          help="K: backprop through the last K denoiser calls only (DRaFT-K)")

    reward = parser.add_argument_group("reward and guards")
    add_metric_arguments(reward)
    reward.add_argument("--reward_resolution", type=int, default=None,
                        help="decode the final latents at this size for the reward (default: the sample size)")
    reward.add_argument("--kl_weight", type=float, default=0.0,
                        help="weight of the squared distance to the frozen base model's predictions")
    reward.add_argument("--diffusion_loss_weight", type=float, default=0.0,
                        help="weight of the diffusion loss on real multi-view data (needs --train_data_dir)")

    add_optimisation_arguments(parser, output_dir="met3r-reward", max_train_steps=500)

    track = add_tracking_arguments(parser, checkpointing_steps=100)
    track.add_argument("--num_validation_prompts", type=int, default=4,
                       help="validation inputs: the first N prompts (0 disables validation)")

    args = parser.parse_args(input_args)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Fail fast, before any model is loaded, on configuration errors (a ValueError naming the option)."""
    validate_training_args(args)
    if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
        raise ValueError(f"--prompts_file {args.prompts_file!r} does not exist")
    if args.prompts_file is None and args.train_data_dir is None:
        raise ValueError("pass --prompts_file or --train_data_dir (whose scenes' prompt.txt are the prompts)")
    for name in ("kl_weight", "diffusion_loss_weight"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.num_views is None and args.train_data_dir is None:
        raise ValueError("--num_views is required without --train_data_dir")
    if args.diffusion_loss_weight > 0 and args.train_data_dir is None:
        raise ValueError("--diffusion_loss_weight > 0 needs real multi-view data: pass --train_data_dir")
    if not args.cfg_scale >= 1:
        raise ValueError(f"--cfg_scale must be >= 1, got {args.cfg_scale}")
    for name in ("num_inference_steps", "truncation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.truncation_steps > args.num_inference_steps:
        raise ValueError(f"--truncation_steps {args.truncation_steps} exceeds --num_inference_steps "
                         f"{args.num_inference_steps}")
    if args.reward_resolution is not None and args.reward_resolution < 1:
        raise ValueError(f"--reward_resolution must be >= 1, got {args.reward_resolution}")


# ----------------------------------------------------------------------------- components


def load_components(args: argparse.Namespace, resolution: int, num_views: int) -> dict:
    """UNet, VAE, DDIM scheduler and (optional) CLIP text encoder + tokenizer, pretrained or tiny."""
    from diffusers import DDIMScheduler

    if args.tiny_test_model:
        components = tiny_training_components(resolution, num_views, args.seed, args.prediction_type)
    else:
        components = load_pretrained_components(args.pretrained_model_name_or_path, args.revision,
                                                scheduler_class=DDIMScheduler)
    scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    if args.prediction_type is not None:
        scheduler.register_to_config(prediction_type=args.prediction_type)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the scheduler's prediction_type {scheduler.config.prediction_type!r} is not one of "
                         f"{PREDICTION_TYPES}")
    components["scheduler"] = scheduler
    return components


def read_prompts(args: argparse.Namespace, dataset: MultiViewFolderDataset | None) -> list[str]:
    """The training prompts: --prompts_file's non-empty lines, else the prompt.txt of every scene."""
    if args.prompts_file is not None:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts_file {args.prompts_file!r} holds no prompt")
        return prompts
    return [(d / PROMPT_FILE).read_text().strip() if (d / PROMPT_FILE).exists() else "" for d in dataset.scene_dirs]


# ----------------------------------------------------------------------------- sampling


def guided_denoiser(model, scheduler, context: torch.Tensor, uncond_context: torch.Tensor,
                    labels: torch.Tensor | None, cfg_scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`denoise(latents, t)`: the classifier-free-guided model output (float32) for latents (N, C, h, w)."""
    if cfg_scale == 1:
        return lambda latents, t: model(scheduler.scale_model_input(latents, t), t, context,
                                        class_labels=labels).sample.float()
    both_context = torch.cat([uncond_context, context])
    both_labels = None if labels is None else torch.cat([labels, labels])

    def denoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = model(model_input, t, both_context, class_labels=both_labels).sample.float().chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return denoise


def sample_latents(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    truncation_steps: int,
    base_denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """DDIM (eta = 0) over `scheduler.timesteps` keeping the graph of the last `truncation_steps` calls only.

    Returns the final latents, the KL term (mean over the kept calls of the mean squared distance between
    `denoise` and `base_denoise`, evaluated without gradient on the same inputs; 0 without `base_denoise`) and the
    kept calls' predictions (for inspection). Each kept call is checkpointed: its activations are recomputed in the
    backward pass. Without autograd (`torch.no_grad`) every call runs without a graph.
    """
    timesteps = scheduler.timesteps
    first_kept = len(timesteps) - truncation_steps
    kl = torch.zeros((), device=latents.device)
    kept = []
    for index, t in enumerate(timesteps):
        if index < first_kept or not torch.is_grad_enabled():
            with torch.no_grad():
                prediction = denoise(latents, t)
        else:
            prediction = checkpoint(denoise, latents, t, use_reentrant=False)
            kept.append(prediction)
            if base_denoise is not None:
                with torch.no_grad():
                    base = base_denoise(latents, t)
                kl = kl + (prediction - base).square().mean()
        latents = scheduler.step(prediction, t, latents).prev_sample
    return latents, kl / max(len(kept), 1), kept


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model of a LoRA-adapted UNet: its adapters switched off inside the block."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def step_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, micro-step, process): the same draws after any resume."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1))


# ----------------------------------------------------------------------------- training


def main(args: argparse.Namespace) -> dict:
    """Train; returns the final step, the per-step logs, the hook's results and output_dir."""
    # the dataset and prompts are read (sizes, view counts checked) before anything heavy is built
    dataset = None
    if args.train_data_dir is not None:
        dataset = MultiViewFolderDataset(args.train_data_dir, num_views=args.num_views, resolution=args.resolution)
    num_views = args.num_views or dataset.num_views
    prompts = read_prompts(args, dataset)

    accelerator = make_accelerator(args)
    resume_path = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    global_batch = args.train_batch_size * accelerator.num_processes
    for name, count in (("prompts", len(prompts)), ("scenes", len(dataset) if args.diffusion_loss_weight else None)):
        if count is not None and count < global_batch:
            raise ValueError(f"--train_batch_size {args.train_batch_size} x {accelerator.num_processes} processes "
                             f"exceeds the {count} {name}")
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    image_size = (args.resolution,) * 2 if args.resolution else dataset.image_size if dataset else None
    check_resolution(args, image_size or (), reward_resolution=args.reward_resolution)
    components = load_components(args, image_size[0] if image_size else 32, num_views)
    unet, vae, text_encoder, tokenizer = (components[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
    scheduler = components["scheduler"]
    prediction_type = scheduler.config.prediction_type
    factor = vae_scale_factor(vae)
    if image_size is None:
        image_size = (unet.config.sample_size * factor,) * 2
    latent_shape = (unet.config.in_channels, image_size[0] // factor, image_size[1] // factor)

    weight_dtype, trainable = prepare_components(accelerator, components, args.use_lora, args.lora_rank)
    base_unet = None
    if not args.use_lora and args.kl_weight > 0:  # the frozen base of a full fine-tune (LoRA's: adapters off)
        base_unet = copy.deepcopy(unet).requires_grad_(False).to(accelerator.device)

    metric = load_metric(args.met3r_factory, args.met3r_kwargs).to(accelerator.device)
    reward = MEt3RReward(metric, pairs=args.met3r_pairs, differentiable=True, chunk_size=args.met3r_chunk_size)

    optimizer, lr_scheduler = make_optimizer(accelerator, args, trainable)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    # every call goes through the unwrapped model (K checkpointed calls per backward); under several processes the
    # gradients are averaged explicitly before the optimizer step
    model = accelerator.unwrap_model(unet)
    init_trackers(accelerator, "met3r-reward", args)

    scheduler.set_timesteps(args.num_inference_steps, device=accelerator.device)
    uncond_embedding = text_embeddings([""], tokenizer, text_encoder, model, accelerator.device)

    def denoisers(prompt_batch: list[str], with_base: bool):
        """The fine-tuned model's guided denoiser for a prompt batch, and the frozen base's (or None)."""
        context = text_embeddings(prompt_batch, tokenizer, text_encoder, model, accelerator.device)
        context = context.repeat_interleave(num_views, 0)
        uncond = uncond_embedding.expand(len(context), -1, -1)
        labels = view_labels(model, len(prompt_batch), num_views, accelerator.device)
        denoise = guided_denoiser(model, scheduler, context, uncond, labels, args.cfg_scale)
        if not with_base:
            return denoise, None
        if base_unet is not None:
            return denoise, guided_denoiser(base_unet, scheduler, context, uncond, labels, args.cfg_scale)

        def base_denoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with adapters_disabled(model):
                return denoise(latents, t)

        return denoise, base_denoise

    def initial_latents(generators: list[torch.Generator]) -> torch.Tensor:
        latents = torch.cat([torch.randn((num_views, *latent_shape), generator=g, device=g.device) for g in generators])
        return latents.to(accelerator.device) * scheduler.init_noise_sigma

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return decode_views(vae, latents.to(weight_dtype), ViewLayout("batch", num_views),
                            size=args.reward_resolution, gradient_checkpointing=True).float()

    def sample_views(prompt_batch: list[str], generators: list[torch.Generator]) -> torch.Tensor:
        """Sample the views of each prompt without gradient: (b, V, 3, H, W) in [-1, 1] (the hook's sample_fn)."""
        model.eval()
        denoise, _ = denoisers(prompt_batch, with_base=False)
        with torch.no_grad(), accelerator.autocast():
            latents, _, _ = sample_latents(denoise, scheduler, initial_latents(generators), args.truncation_steps)
            views = decode(latents)
        model.train()
        return views

    def batch_indices(count: int, index: int, seed: int) -> list[int]:
        """This process's items of the `index`-th batch: a (seed, epoch) order (training_utils), no repeats per epoch."""
        epoch, position = divmod(index, count // global_batch)
        return epoch_batches(count, args.train_batch_size, seed, epoch, accelerator.num_processes,
                             accelerator.process_index)[position]

    def diffusion_loss(index: int, generator: torch.Generator) -> torch.Tensor:
        """The plain diffusion loss on a batch of real scenes (the anchor against reward hacking)."""
        batch = collate_multiview([dataset[i] for i in batch_indices(len(dataset), index, args.seed + 1)])
        pixel_values = batch["pixel_values"].to(accelerator.device, weight_dtype).flatten(0, 1)
        with torch.no_grad():
            latents = vae.encode(pixel_values).latent_dist.sample(generator).float() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch["prompt"]),),
                                  generator=generator).repeat_interleave(num_views).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        context = text_embeddings(batch["prompt"], tokenizer, text_encoder, model, accelerator.device)
        labels = view_labels(model, len(batch["prompt"]), num_views, accelerator.device)
        with accelerator.autocast():
            prediction = model(noisy, timesteps, context.repeat_interleave(num_views, 0), class_labels=labels).sample
        target = {"epsilon": noise, "sample": latents}.get(prediction_type)
        if target is None:
            target = scheduler.get_velocity(latents, noise, timesteps)
        return F.mse_loss(prediction.float(), target.float())

    def micro_step(step: int, micro: int) -> dict[str, float]:
        """Sample, score, backprop one micro-batch; returns its log values."""
        index = step * args.gradient_accumulation_steps + micro
        generator = step_generator(args.seed, step, micro, accelerator.process_index)
        prompt_batch = [prompts[i] for i in batch_indices(len(prompts), index, args.seed)]
        denoise, base_denoise = denoisers(prompt_batch, with_base=args.kl_weight > 0)
        with accelerator.autocast():
            latents, kl, _ = sample_latents(denoise, scheduler, initial_latents([generator] * len(prompt_batch)),
                                            args.truncation_steps, base_denoise)
        views = decode(latents)
        rewards, info = reward(views)
        valid = info["valid_samples"]
        # samples where no pair overlaps carry no reward (and no gradient); they are counted, not averaged in
        mean_reward = torch.where(valid, rewards, torch.zeros_like(rewards)).sum() / valid.sum().clamp_min(1)
        loss = -mean_reward + args.kl_weight * kl
        real = torch.zeros((), device=accelerator.device)
        if args.diffusion_loss_weight > 0:
            real = diffusion_loss(index, generator)
            loss = loss + args.diffusion_loss_weight * real
        accelerator.backward(loss / args.gradient_accumulation_steps)
        logs = {"loss": loss.item(), "reward": mean_reward.item(), "kl": kl.item(), "diffusion_loss": real.item(),
                "empty_pairs": float(info["num_empty_pairs"]), "empty_samples": float(info["num_empty_samples"])}
        logs.update({f"stats/{k}": v.mean().item() for k, v in image_statistics(views).items()})
        return logs

    hook = None
    if args.num_validation_prompts > 0:
        hook = MEt3REvalHook(accelerator, args.validation_steps, sample_views, metric,
                             prompts[: args.num_validation_prompts], pairs=args.met3r_pairs,
                             batch_size=args.validation_batch_size, seed=args.validation_seed)
    global_step = 0
    if resume_path is not None:  # "latest" without a complete checkpoint starts from scratch
        global_step = load_checkpoint(accelerator, resume_path, kind=CHECKPOINT_KIND)["global_step"]
        accelerator.print(f"Resuming from {resume_path} (step {global_step})")

    logger.info(f"{len(prompts)} prompts x {num_views} views, latents {latent_shape}; {args.max_train_steps} steps of "
                f"{global_batch * args.gradient_accumulation_steps} prompts; DDIM {args.num_inference_steps} steps, "
                f"cfg {args.cfg_scale}, K = {args.truncation_steps}; kl_weight {args.kl_weight}, "
                f"diffusion_loss_weight {args.diffusion_loss_weight}")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    history = []
    unet.train()
    for step in range(global_step, args.max_train_steps):
        start = time.perf_counter()
        micro_logs = [micro_step(step, micro) for micro in range(args.gradient_accumulation_steps)]
        if accelerator.num_processes > 1:
            for parameter in trainable:
                if parameter.grad is not None:
                    parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        global_step = step + 1

        names = list(micro_logs[0])
        values = torch.tensor([[m[k] for k in names] for m in micro_logs], device=accelerator.device).mean(0)
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="mean")
        logs = dict(zip(names, values.tolist()))
        logs.update(lr=lr_scheduler.get_last_lr()[0], step_seconds=time.perf_counter() - start)
        history.append({"step": global_step, **logs})
        progress.update(1)
        progress.set_postfix(reward=f"{logs['reward']:.4g}", kl=f"{logs['kl']:.3g}",
                             contrast=f"{logs['stats/contrast']:.3g}")
        accelerator.log(logs, step=global_step)
        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, global_step, total_limit=args.checkpoints_total_limit,
                            kind=CHECKPOINT_KIND)
        if hook is not None:
            run_validation(accelerator, hook, global_step, args.output_dir)

    finish_training(accelerator, model, hook, global_step, args)
    return {"global_step": global_step, "history": history, "validation": hook.history if hook else [],
            "output_dir": args.output_dir}


if __name__ == "__main__":
    main(parse_args())
