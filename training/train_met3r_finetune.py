#!/usr/bin/env python
"""Consistency-regularised fine-tuning of a multi-view diffusion UNet with Accelerate.

loss = diffusion loss + λ · MEt3R(decoded x0 estimates of the V views of each sample), the MEt3R term only for
samples whose timestep is at most `--met3r_max_timestep` (x0 estimates are too blurry to score at high noise).

Views are batch entries (MVDream / MV-Adapter layout): a batch of B scenes is B*V UNet inputs, the V views of a scene
consecutive and sharing one timestep. When the UNet has class embeddings (`num_class_embeds`) each view gets its
view index as class label. The text prompt of the scene (its `prompt.txt`) conditions every view.

    accelerate launch training/train_met3r_finetune.py \
      --pretrained_model_name_or_path path/to/multiview-model --train_data_dir data/scenes --num_views 4 \
      --resolution 256 --use_lora --met3r_weight 0.1 --met3r_max_timestep 400 --output_dir runs/met3r-lora

`--tiny_test_model` replaces the pretrained components by tiny randomly initialised ones built from configs (and a
byte-level CLIP tokenizer written locally), so the script runs on a CPU without any download.
See docs/training.md for the dataset format and every option.
"""
from __future__ import annotations

import argparse
import collections
import math
import os

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from met3r_diffusers.data import MultiViewFolderDataset, collate_multiview
from met3r_diffusers.diffusion import ViewLayout, decode_views, predict_x0
from met3r_diffusers.evaluation import MEt3REvalHook
from met3r_diffusers.loss import MEt3RLoss
from met3r_diffusers.testing import tiny_training_components
from met3r_diffusers.training_utils import (
    LORA_TARGET_MODULES,  # noqa: F401 - the tests read it from the script
    PREDICTION_TYPES,
    add_metric_arguments,
    add_model_arguments,
    add_optimisation_arguments,
    add_tracking_arguments,
    check_resolution,
    epoch_dataloader,
    find_checkpoint,
    finish_training,
    init_trackers,
    load_checkpoint,
    load_metric,
    load_pretrained_components,
    make_accelerator,
    make_optimizer,
    prepare_components,
    resume_position,
    run_validation,
    save_checkpoint,
    text_embeddings,
    validate_training_args,
    view_labels,
)
from met3r_diffusers.validation import check_finite

logger = get_logger(__name__)
# what this script writes into its checkpoints, so that the other training script refuses to resume them
CHECKPOINT_KIND = "train_met3r_finetune"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Command line of the script (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, required=True, help="folder of scene folders (see data.py)")
    data.add_argument("--num_views", type=int, default=None, help="views per scene (default: all)")
    data.add_argument("--resolution", type=int, default=None, help="resize views to this square size")
    data.add_argument("--train_batch_size", type=int, default=1, help="scenes per device batch")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    add_optimisation_arguments(parser, output_dir="met3r-finetune", max_train_steps=1000)

    met3r = parser.add_argument_group("MEt3R regulariser")
    met3r.add_argument("--met3r_weight", type=float, default=0.1, help="λ; 0 trains with the diffusion loss only")
    met3r.add_argument("--met3r_max_timestep", type=int, default=None,
                       help="timestep gate: only samples with t <= this get the MEt3R term (default: all)")
    met3r.add_argument("--met3r_num_pairs", type=int, default=None, help="random subset of pairs per step")
    met3r.add_argument("--met3r_resolution", type=int, default=None,
                       help="decode x0 at this size for the regulariser (default: the training resolution)")
    met3r.add_argument("--vae_gradient_checkpointing", action="store_true",
                       help="recompute the VAE decoder in the backward pass of the regulariser")
    add_metric_arguments(met3r)

    track = add_tracking_arguments(parser, checkpointing_steps=500)
    track.add_argument("--num_validation_samples", type=int, default=4,
                       help="validation inputs: the prompts of the first N scenes (0 disables validation)")
    track.add_argument("--validation_inference_steps", type=int, default=20)

    args = parser.parse_args(input_args)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Fail fast, before any model is loaded, on configuration errors (a ValueError naming the option)."""
    check_finite("--met3r_weight (λ)", args.met3r_weight, minimum=0)
    validate_training_args(args)
    if args.validation_inference_steps < 1:
        raise ValueError(f"--validation_inference_steps must be >= 1, got {args.validation_inference_steps}")
    for name in ("dataloader_num_workers", "num_validation_samples", "met3r_max_timestep"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("met3r_resolution", "met3r_num_pairs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")


# ----------------------------------------------------------------------------- training


def main(args: argparse.Namespace) -> dict:
    """Train; returns the final step, the mean diffusion loss of the last 50 steps, the hook's results, output_dir."""
    # the dataset is read (sizes, view counts, camera files checked) before anything heavy is built
    dataset = MultiViewFolderDataset(args.train_data_dir, num_views=args.num_views, resolution=args.resolution)
    num_views = dataset.num_views
    height, width = dataset.image_size

    accelerator = make_accelerator(args, gradient_accumulation_steps=args.gradient_accumulation_steps)
    check_resolution(args, (height, width), met3r_resolution=args.met3r_resolution)
    resume_path = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    components = (tiny_training_components(height, num_views, args.seed, args.prediction_type) if args.tiny_test_model
                  else load_pretrained_components(args.pretrained_model_name_or_path, args.revision,
                                                  prediction_type=args.prediction_type))
    unet, vae, text_encoder, tokenizer = (components[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
    noise_scheduler = components["scheduler"]
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the scheduler's prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")

    weight_dtype, trainable = prepare_components(accelerator, components, args.use_lora, args.lora_rank)
    if args.vae_gradient_checkpointing:
        vae.enable_gradient_checkpointing()

    metric = load_metric(args.met3r_factory, args.met3r_kwargs).to(accelerator.device)
    met3r_loss = MEt3RLoss(metric, pairs=args.met3r_pairs, num_pairs=args.met3r_num_pairs,
                           max_timestep=args.met3r_max_timestep, chunk_size=args.met3r_chunk_size)

    def train_dataloader(epoch: int, skip_batches: int = 0) -> torch.utils.data.DataLoader:
        """The epoch's batches in a (seed, epoch)-determined order, sharded over the processes (training_utils)."""
        return epoch_dataloader(accelerator, dataset, args.train_batch_size, args.seed, epoch, skip_batches,
                                collate_fn=collate_multiview, num_workers=args.dataloader_num_workers)

    num_batches_per_epoch = len(train_dataloader(0))
    if num_batches_per_epoch == 0:
        raise ValueError(f"--train_batch_size {args.train_batch_size} x {accelerator.num_processes} processes exceeds "
                         f"the {len(dataset)} scenes")
    optimizer, lr_scheduler = make_optimizer(accelerator, args, trainable)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    num_update_steps_per_epoch = math.ceil(num_batches_per_epoch / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    init_trackers(accelerator, "met3r-finetune", args)

    def sample_views(prompts: list[str], generators: list[torch.Generator]) -> torch.Tensor:
        """DDIM-sample the V views of each prompt (no classifier-free guidance); (b, V, 3, H, W) in [-1, 1]."""
        from diffusers import DDIMScheduler

        model = accelerator.unwrap_model(unet)
        was_training = model.training
        model.eval()
        scheduler = DDIMScheduler.from_config(noise_scheduler.config)
        scheduler.set_timesteps(args.validation_inference_steps, device=accelerator.device)
        latent_shape = (num_views, model.config.in_channels, model.config.sample_size, model.config.sample_size)
        latents = torch.cat([torch.randn(latent_shape, generator=g, device=g.device) for g in generators])
        latents = latents.to(accelerator.device) * scheduler.init_noise_sigma
        context = text_embeddings(prompts, tokenizer, text_encoder, model, accelerator.device)
        context = context.repeat_interleave(num_views, 0)
        labels = view_labels(model, len(prompts), num_views, accelerator.device)
        with accelerator.autocast():
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(latents, t)
                noise_pred = model(model_input, t, context, class_labels=labels).sample
                latents = scheduler.step(noise_pred.float(), t, latents).prev_sample
        model.train(was_training)
        return decode_views(vae, latents.to(weight_dtype), ViewLayout("batch", num_views), size=(height, width)).float()

    hook = None
    if args.num_validation_samples > 0:
        prompts = [dataset[k]["prompt"] for k in range(min(args.num_validation_samples, len(dataset)))]
        hook = MEt3REvalHook(accelerator, args.validation_steps, sample_views, metric, prompts,
                             pairs=args.met3r_pairs, batch_size=args.validation_batch_size,
                             seed=args.validation_seed)
    global_step, first_epoch, resume_batches = 0, 0, 0
    recent_losses = collections.deque(maxlen=50)
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        state = load_checkpoint(accelerator, resume_path, kind=CHECKPOINT_KIND)
        global_step = state["global_step"]
        recent_losses.extend(state["extra"].get("recent_losses", []))
        first_epoch, resume_batches = resume_position(global_step, num_update_steps_per_epoch,
                                                      args.gradient_accumulation_steps)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"{len(dataset)} scenes x {num_views} views of {height}x{width}; {args.max_train_steps} steps of "
                f"{total_batch} scenes; λ = {args.met3r_weight}, "
                f"gate t <= {'T' if args.met3r_max_timestep is None else args.met3r_max_timestep}")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    scaling_factor = vae.config.scaling_factor
    unet.train()
    for epoch in range(first_epoch, num_train_epochs):
        for batch in train_dataloader(epoch, resume_batches if epoch == first_epoch else 0):
            if global_step >= args.max_train_steps:  # resumed at (or past) the last step: nothing left to train
                break
            with accelerator.accumulate(unet):
                pixel_values = batch["pixel_values"].to(weight_dtype)  # (B, V, 3, H, W)
                batch_size = pixel_values.shape[0]
                latents = vae.encode(pixel_values.flatten(0, 1)).latent_dist.sample() * scaling_factor
                noise = torch.randn_like(latents)
                # one timestep per scene, shared by its views
                timesteps = torch.randint(0, num_train_timesteps, (batch_size,), device=latents.device)
                timesteps = timesteps.repeat_interleave(num_views)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                context = text_embeddings(batch["prompt"], tokenizer, text_encoder, unet, accelerator.device)
                context = context.repeat_interleave(num_views, 0)
                labels = view_labels(accelerator.unwrap_model(unet), batch_size, num_views, accelerator.device)
                model_pred = unet(noisy_latents, timesteps, context, class_labels=labels).sample
                if prediction_type == "epsilon":
                    target = noise
                elif prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = latents
                diffusion_loss = F.mse_loss(model_pred.float(), target.float())

                reg = torch.zeros((), device=latents.device)
                if args.met3r_weight > 0:
                    scene_t = timesteps[::num_views]
                    gate = scene_t <= (args.met3r_max_timestep if args.met3r_max_timestep is not None else math.inf)
                    if bool(gate.any()):  # decode only the scenes that pass the gate
                        chosen = gate.repeat_interleave(num_views)
                        x0 = predict_x0(model_pred[chosen].float(), noisy_latents[chosen].float(),
                                        timesteps[chosen], noise_scheduler)
                        views = decode_views(vae, x0, ViewLayout("batch", num_views), size=args.met3r_resolution,
                                             gradient_checkpointing=args.vae_gradient_checkpointing)
                        reg = met3r_loss(views.float(), timesteps=scene_t[gate])
                loss = diffusion_loss + args.met3r_weight * reg

                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                global_step += 1
                progress.update(1)
                logs = {"loss": loss.detach().item(), "diffusion_loss": diffusion_loss.detach().item(),
                        "met3r_loss": reg.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
                recent_losses.append(logs["diffusion_loss"])
                progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
                accelerator.log(logs, step=global_step)
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit,
                                    extra={"recent_losses": list(recent_losses)}, kind=CHECKPOINT_KIND)
                if hook is not None:
                    run_validation(accelerator, hook, global_step, args.output_dir)
                if global_step >= args.max_train_steps:
                    break
        if global_step >= args.max_train_steps:
            break

    finish_training(accelerator, accelerator.unwrap_model(unet), hook, global_step, args)
    return {
        "global_step": global_step,
        "final_diffusion_loss": sum(recent_losses) / max(len(recent_losses), 1),  # mean of the last 50 steps
        "validation": hook.history if hook else [],
        "output_dir": args.output_dir,
    }


if __name__ == "__main__":
    main(parse_args())
