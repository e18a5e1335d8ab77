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
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from met3r_diffusers.data import MultiViewFolderDataset, collate_multiview
from met3r_diffusers.diffusion import ViewLayout, decode_views, predict_x0
from met3r_diffusers.evaluation import MEt3REvalHook
from met3r_diffusers.loss import MEt3RLoss
from met3r_diffusers.testing import TINY_TRAINING_VAE_SCALE_FACTOR, tiny_training_components
from met3r_diffusers.training_utils import (
    epoch_dataloader,
    find_checkpoint,
    load_checkpoint,
    preserved_rng_state,
    resume_position,
    save_checkpoint,
)
from met3r_diffusers.validation import check_finite

logger = get_logger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Command line of the script (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="diffusers model folder or hub id with unet/, vae/, scheduler/ and optionally "
                            "text_encoder/ + tokenizer/ sub-folders")
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--tiny_test_model", action="store_true",
                       help="tiny random UNet/VAE/CLIP built from configs (tests, CPU smoke runs; no download)")
    model.add_argument("--prediction_type", type=str, default=None,
                       help=f"one of {PREDICTION_TYPES}; default: the scheduler's")
    model.add_argument("--use_lora", action="store_true", help="train LoRA adapters (peft) instead of the full UNet")
    model.add_argument("--lora_rank", type=int, default=4)

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, required=True, help="folder of scene folders (see data.py)")
    data.add_argument("--num_views", type=int, default=None, help="views per scene (default: all)")
    data.add_argument("--resolution", type=int, default=None, help="resize views to this square size")
    data.add_argument("--train_batch_size", type=int, default=1, help="scenes per device batch")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--output_dir", type=str, default="met3r-finetune")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--max_train_steps", type=int, default=1000)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--lr_scheduler", type=str, default="constant",
                       help="any of diffusers.optimization's schedules: constant, linear, cosine, ...")
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])

    met3r = parser.add_argument_group("MEt3R regulariser")
    met3r.add_argument("--met3r_weight", type=float, default=0.1, help="λ; 0 trains with the diffusion loss only")
    met3r.add_argument("--met3r_max_timestep", type=int, default=None,
                       help="timestep gate: only samples with t <= this get the MEt3R term (default: all)")
    met3r.add_argument("--met3r_pairs", type=str, default="adjacent", choices=["adjacent", "all", "reference"])
    met3r.add_argument("--met3r_num_pairs", type=int, default=None, help="random subset of pairs per step")
    met3r.add_argument("--met3r_resolution", type=int, default=None,
                       help="decode x0 at this size for the regulariser (default: the training resolution)")
    met3r.add_argument("--met3r_chunk_size", type=int, default=None, help="samples per metric call")
    met3r.add_argument("--vae_gradient_checkpointing", action="store_true",
                       help="recompute the VAE decoder in the backward pass of the regulariser")
    met3r.add_argument("--met3r_factory", type=str, default="met3r_diffusers:MEt3R",
                       help="'module:callable' or 'path/to/file.py:callable' returning the metric")
    met3r.add_argument("--met3r_kwargs", type=str, default="{}", help="JSON keyword arguments for --met3r_factory")

    track = parser.add_argument_group("logging, checkpoints, validation")
    track.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none")
    track.add_argument("--logging_dir", type=str, default="logs", help="inside output_dir")
    track.add_argument("--checkpointing_steps", type=int, default=500)
    track.add_argument("--checkpoints_total_limit", type=int, default=None)
    track.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="a checkpoint-N folder (in output_dir) or path, or 'latest': the newest complete one "
                            "(none yet: start from scratch)")
    track.add_argument("--validation_steps", type=int, default=0,
                       help="run the MEt3R evaluation hook every N steps (0: only at the end)")
    track.add_argument("--num_validation_samples", type=int, default=4,
                       help="validation inputs: the prompts of the first N scenes (0 disables validation)")
    track.add_argument("--validation_inference_steps", type=int, default=20)
    track.add_argument("--validation_batch_size", type=int, default=1)
    track.add_argument("--validation_seed", type=int, default=0)

    args = parser.parse_args(input_args)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Fail fast, before any model is loaded, on configuration errors (a ValueError naming the option)."""
    check_finite("--met3r_weight (λ)", args.met3r_weight, minimum=0)
    check_finite("--learning_rate", args.learning_rate, minimum=0)
    check_finite("--adam_weight_decay", args.adam_weight_decay, minimum=0)
    check_finite("--adam_epsilon", args.adam_epsilon, minimum=0)
    check_finite("--max_grad_norm", args.max_grad_norm, minimum=0)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= check_finite(f"--{name}", getattr(args, name)) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir {args.train_data_dir!r} does not exist or is not a folder")
    if args.prediction_type is not None and args.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"--prediction_type must be one of {PREDICTION_TYPES}, got {args.prediction_type!r}")
    if (args.pretrained_model_name_or_path is None) == (not args.tiny_test_model):
        raise ValueError("pass exactly one of --pretrained_model_name_or_path and --tiny_test_model")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"--lr_scheduler must be one of {LR_SCHEDULERS}, got {args.lr_scheduler!r}")
    for name in ("max_train_steps", "gradient_accumulation_steps", "train_batch_size", "checkpointing_steps",
                 "validation_inference_steps", "validation_batch_size", "lora_rank"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("seed", "lr_warmup_steps", "dataloader_num_workers", "validation_steps", "num_validation_samples",
                 "met3r_max_timestep"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("num_views", "resolution", "met3r_resolution", "met3r_num_pairs", "met3r_chunk_size",
                 "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_views is not None and args.num_views < 2:
        raise ValueError(f"--num_views must be >= 2 (MEt3R scores pairs of views), got {args.num_views}")
    factory = resolve_factory(args.met3r_factory)
    try:
        args.met3r_kwargs = json.loads(args.met3r_kwargs) if isinstance(args.met3r_kwargs, str) else args.met3r_kwargs
    except json.JSONDecodeError as error:
        raise ValueError(f"--met3r_kwargs is not valid JSON: {error}") from None
    if not isinstance(args.met3r_kwargs, dict):
        raise ValueError(f"--met3r_kwargs must be a JSON object of keyword arguments, got {args.met3r_kwargs!r}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no introspectable signature: the call itself will tell
        signature = None
    if signature is not None:
        try:
            signature.bind(**args.met3r_kwargs)
        except TypeError as error:
            raise ValueError(f"--met3r_kwargs do not fit --met3r_factory {args.met3r_factory!r}: {error}") from None


def resolve_factory(factory: str) -> Callable:
    """The callable named by 'module:callable' or 'path/to/file.py:callable' (ValueError naming --met3r_factory)."""
    module_name, _, attribute = factory.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"--met3r_factory must look like 'module:callable', got {factory!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise FileNotFoundError(f"no such file {module_name!r}")
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as error:
        raise ValueError(f"--met3r_factory {factory!r}: cannot load {module_name!r} ({error})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"--met3r_factory {factory!r}: {module_name!r} has no callable {attribute!r}")
    return function


def _check_resolution(args: argparse.Namespace, image_size: tuple[int, int]) -> None:
    """Training and regulariser sizes must be multiples of the VAE's down-sampling (read from its config only)."""
    if args.tiny_test_model:
        factor = TINY_TRAINING_VAE_SCALE_FACTOR
    else:
        from diffusers import AutoencoderKL

        config = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision)
        factor = 2 ** (len(config["block_out_channels"]) - 1)
    if any(size % factor for size in image_size):
        origin = "--resolution" if args.resolution is not None else "the images' size (set --resolution)"
        raise ValueError(f"{origin}: {image_size[0]}x{image_size[1]} is not a multiple of the VAE's down-sampling "
                         f"factor {factor}")
    if args.met3r_resolution is not None and args.met3r_resolution % factor:
        raise ValueError(f"--met3r_resolution {args.met3r_resolution} is not a multiple of the VAE's down-sampling "
                         f"factor {factor}")


# ----------------------------------------------------------------------------- components


def _pretrained_components(args: argparse.Namespace) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    path, revision = args.pretrained_model_name_or_path, args.revision
    components = {
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision),
        "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision),
        "scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
        "text_encoder": None,
        "tokenizer": None,
    }
    if args.prediction_type is not None:
        components["scheduler"].register_to_config(prediction_type=args.prediction_type)
    try:
        from transformers import CLIPTextModel, CLIPTokenizer

        components["tokenizer"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        components["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision)
    except OSError:
        logger.info("no tokenizer/text_encoder: the UNet is conditioned on a zero text embedding")
    return components


def load_metric(factory: str, kwargs: dict):
    """Build the metric from 'module:callable' or 'path/to/file.py:callable'."""
    return resolve_factory(factory)(**kwargs)


def _text_embeddings(prompts: list[str], tokenizer, text_encoder, unet, device) -> torch.Tensor:
    """(len(prompts), L, D) text embeddings, or zeros (len(prompts), 1, cross_attention_dim) without a text encoder."""
    if text_encoder is None:
        return torch.zeros(len(prompts), 1, unet.config.cross_attention_dim, device=device)
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def _view_labels(unet, batch: int, num_views: int, device) -> torch.Tensor | None:
    """View index of every batch entry (0..V-1 per sample) when the UNet takes class labels."""
    if unet.config.num_class_embeds is None and unet.config.class_embed_type is None:
        return None
    return torch.arange(num_views, device=device).repeat(batch)


# ----------------------------------------------------------------------------- training


def main(args: argparse.Namespace) -> dict:
    """Train; returns the final step, the mean diffusion loss of the last 50 steps, the hook's results, output_dir."""
    # the dataset is read (sizes, view counts, camera files checked) before anything heavy is built
    dataset = MultiViewFolderDataset(args.train_data_dir, num_views=args.num_views, resolution=args.resolution)
    num_views = dataset.num_views
    height, width = dataset.image_size

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU (CPU autocast mixes float16 and float32 operands); "
                         "use bf16 or no on the CPU")
    _check_resolution(args, (height, width))
    resume_path = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    components = (tiny_training_components(height, num_views, args.seed, args.prediction_type) if args.tiny_test_model
                  else _pretrained_components(args))
    unet, vae, text_encoder, tokenizer = (components[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
    noise_scheduler = components["scheduler"]
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the scheduler's prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    if text_encoder is not None:
        text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    if args.vae_gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if args.use_lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGET_MODULES))
    trainable = [p for p in unet.parameters() if p.requires_grad]  # kept in float32; autocast does the rest

    metric = load_metric(args.met3r_factory, args.met3r_kwargs).to(accelerator.device)
    met3r_loss = MEt3RLoss(metric, pairs=args.met3r_pairs, num_pairs=args.met3r_num_pairs,
                           max_timestep=args.met3r_max_timestep, chunk_size=args.met3r_chunk_size)

    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    def train_dataloader(epoch: int, skip_batches: int = 0) -> torch.utils.data.DataLoader:
        """The epoch's batches in a (seed, epoch)-determined order, sharded over the processes (training_utils)."""
        return epoch_dataloader(accelerator, dataset, args.train_batch_size, args.seed, epoch, skip_batches,
                                collate_fn=collate_multiview, num_workers=args.dataloader_num_workers)

    num_batches_per_epoch = len(train_dataloader(0))
    if num_batches_per_epoch == 0:
        raise ValueError(f"--train_batch_size {args.train_batch_size} x {accelerator.num_processes} processes exceeds "
                         f"the {len(dataset)} scenes")
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    num_update_steps_per_epoch = math.ceil(num_batches_per_epoch / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("met3r-finetune", config=config)

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
        context = _text_embeddings(prompts, tokenizer, text_encoder, model, accelerator.device)
        context = context.repeat_interleave(num_views, 0)
        labels = _view_labels(model, len(prompts), num_views, accelerator.device)
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
    validation_log = os.path.join(args.output_dir, "met3r_validation.jsonl")

    def validate(step: int, force: bool = False) -> None:
        with preserved_rng_state():  # validation never changes the training's random numbers
            results = hook.evaluate(step) if force else hook(step)
        if results is not None and accelerator.is_main_process:
            logger.info(f"step {step}: MEt3R {results['score']:.5f} {results['pair_scores']}")
            with open(validation_log, "a") as f:
                f.write(json.dumps({k: v for k, v in results.items() if not torch.is_tensor(v)}) + "\n")

    global_step, first_epoch, resume_batches = 0, 0, 0
    recent_losses = collections.deque(maxlen=50)
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        state = load_checkpoint(accelerator, resume_path)
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
            with accelerator.accumulate(unet):
                pixel_values = batch["pixel_values"].to(weight_dtype)  # (B, V, 3, H, W)
                batch_size = pixel_values.shape[0]
                latents = vae.encode(pixel_values.flatten(0, 1)).latent_dist.sample() * scaling_factor
                noise = torch.randn_like(latents)
                # one timestep per scene, shared by its views
                timesteps = torch.randint(0, num_train_timesteps, (batch_size,), device=latents.device)
                timesteps = timesteps.repeat_interleave(num_views)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                with torch.no_grad():
                    context = _text_embeddings(batch["prompt"], tokenizer, text_encoder, unet, accelerator.device)
                context = context.repeat_interleave(num_views, 0)
                labels = _view_labels(accelerator.unwrap_model(unet), batch_size, num_views, accelerator.device)
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
                                    extra={"recent_losses": list(recent_losses)})
                if hook is not None:
                    validate(global_step)
                if global_step >= args.max_train_steps:
                    break
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    if hook is not None and not (args.validation_steps and global_step % args.validation_steps == 0):
        validate(global_step, force=True)
    if accelerator.is_main_process:
        _save_weights(accelerator.unwrap_model(unet), args)
    accelerator.end_training()
    return {
        "global_step": global_step,
        "final_diffusion_loss": sum(recent_losses) / max(len(recent_losses), 1),  # mean of the last 50 steps
        "validation": hook.history if hook else [],
        "output_dir": args.output_dir,
    }


def _save_weights(unet, args: argparse.Namespace) -> None:
    """Final weights: LoRA layers (diffusers' pytorch_lora_weights.safetensors) or the full UNet."""
    if args.use_lora:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(args.output_dir, unet_lora_layers=lora_layers,
                                                  safe_serialization=True)
    else:
        unet.save_pretrained(os.path.join(args.output_dir, "unet"))


if __name__ == "__main__":
    main(parse_args())
