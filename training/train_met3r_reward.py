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
import importlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from met3r_diffusers.data import PROMPT_FILE, MultiViewFolderDataset, collate_multiview
from met3r_diffusers.diffusion import ViewLayout, decode_views, vae_scale_factor
from met3r_diffusers.evaluation import MEt3REvalHook
from met3r_diffusers.rewards import MEt3RReward, image_statistics
from met3r_diffusers.testing import tiny_training_components
from met3r_diffusers.training_utils import (
    epoch_batches,
    find_checkpoint,
    load_checkpoint,
    preserved_rng_state,
    save_checkpoint,
)

logger = get_logger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


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
    reward.add_argument("--met3r_factory", type=str, default="met3r_diffusers:MEt3R",
                        help="'module:callable' or 'path/to/file.py:callable' returning the metric")
    reward.add_argument("--met3r_kwargs", type=str, default="{}", help="JSON keyword arguments for --met3r_factory")
    reward.add_argument("--met3r_pairs", type=str, default="adjacent", choices=["adjacent", "all", "reference"])
    reward.add_argument("--met3r_chunk_size", type=int, default=None, help="samples per metric call")
    reward.add_argument("--reward_resolution", type=int, default=None,
                        help="decode the final latents at this size for the reward (default: the sample size)")
    reward.add_argument("--kl_weight", type=float, default=0.0,
                        help="weight of the squared distance to the frozen base model's predictions")
    reward.add_argument("--diffusion_loss_weight", type=float, default=0.0,
                        help="weight of the diffusion loss on real multi-view data (needs --train_data_dir)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--output_dir", type=str, default="met3r-reward")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--max_train_steps", type=int, default=500)
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

    track = parser.add_argument_group("logging, checkpoints, validation")
    track.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none")
    track.add_argument("--logging_dir", type=str, default="logs", help="inside output_dir")
    track.add_argument("--checkpointing_steps", type=int, default=100)
    track.add_argument("--checkpoints_total_limit", type=int, default=None)
    track.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="a checkpoint-N folder in output_dir, or 'latest'")
    track.add_argument("--validation_steps", type=int, default=0,
                       help="run the MEt3R evaluation hook every N steps (0: only at the end)")
    track.add_argument("--num_validation_prompts", type=int, default=4,
                       help="validation inputs: the first N prompts (0 disables validation)")
    track.add_argument("--validation_batch_size", type=int, default=1)
    track.add_argument("--validation_seed", type=int, default=0)

    args = parser.parse_args(input_args)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Fail fast, before any model is loaded, on configuration errors."""
    if (args.pretrained_model_name_or_path is None) == (not args.tiny_test_model):
        raise ValueError("pass exactly one of --pretrained_model_name_or_path and --tiny_test_model")
    if args.prediction_type is not None and args.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"--prediction_type must be one of {PREDICTION_TYPES}, got {args.prediction_type!r}")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir {args.train_data_dir!r} does not exist or is not a folder")
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
    for name in ("max_train_steps", "gradient_accumulation_steps", "train_batch_size", "checkpointing_steps",
                 "num_inference_steps", "truncation_steps", "validation_batch_size", "lora_rank"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.truncation_steps > args.num_inference_steps:
        raise ValueError(f"--truncation_steps {args.truncation_steps} exceeds --num_inference_steps "
                         f"{args.num_inference_steps}")
    for name in ("num_views", "resolution", "reward_resolution", "met3r_chunk_size"):
        if getattr(args, name) is not None and getattr(args, name) < (2 if name == "num_views" else 1):
            raise ValueError(f"--{name} must be >= {2 if name == 'num_views' else 1}, got {getattr(args, name)}")
    if ":" not in args.met3r_factory:
        raise ValueError(f"--met3r_factory must look like 'module:callable', got {args.met3r_factory!r}")
    try:
        args.met3r_kwargs = json.loads(args.met3r_kwargs) if isinstance(args.met3r_kwargs, str) else args.met3r_kwargs
    except json.JSONDecodeError as error:
        raise ValueError(f"--met3r_kwargs is not valid JSON: {error}") from None


# ----------------------------------------------------------------------------- components


def load_metric(factory: str, kwargs: dict):
    """Build the metric from 'module:callable' or 'path/to/file.py:callable'."""
    module_name, _, attribute = factory.rpartition(":")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, attribute)(**kwargs)


def load_components(args: argparse.Namespace, resolution: int, num_views: int) -> dict:
    """UNet, VAE, DDIM scheduler and (optional) CLIP text encoder + tokenizer, pretrained or tiny."""
    from diffusers import DDIMScheduler

    if args.tiny_test_model:
        components = tiny_training_components(resolution, num_views, args.seed, args.prediction_type)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        path, revision = args.pretrained_model_name_or_path, args.revision
        components = {
            "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision),
            "scheduler": DDIMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
            "text_encoder": None,
            "tokenizer": None,
        }
        try:
            from transformers import CLIPTextModel, CLIPTokenizer

            components["tokenizer"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
            components["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                                       revision=revision)
        except OSError:
            logger.info("no tokenizer/text_encoder: the UNet is conditioned on a zero text embedding")
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


def text_embeddings(prompts: list[str], tokenizer, text_encoder, unet, device) -> torch.Tensor:
    """(len(prompts), L, D) text embeddings, or zeros (len(prompts), 1, cross_attention_dim) without a text encoder."""
    if text_encoder is None:
        return torch.zeros(len(prompts), 1, unet.config.cross_attention_dim, device=device)
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        return text_encoder(ids)[0]


def view_labels(unet, batch: int, num_views: int, device) -> torch.Tensor | None:
    """View index of every batch entry (0..V-1 per sample) when the UNet takes class labels."""
    if unet.config.num_class_embeds is None and unet.config.class_embed_type is None:
        return None
    return torch.arange(num_views, device=device).repeat(batch)


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

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU (CPU autocast mixes float16 and float32 operands); "
                         "use bf16 or no on the CPU")
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
    components = load_components(args, image_size[0] if image_size else 32, num_views)
    unet, vae, text_encoder, tokenizer = (components[k] for k in ("unet", "vae", "text_encoder", "tokenizer"))
    scheduler = components["scheduler"]
    prediction_type = scheduler.config.prediction_type
    factor = vae_scale_factor(vae)
    if image_size is None:
        image_size = (unet.config.sample_size * factor,) * 2
    latent_shape = (unet.config.in_channels, image_size[0] // factor, image_size[1] // factor)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    if text_encoder is not None:
        text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    base_unet = None
    if args.use_lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGET_MODULES))
    elif args.kl_weight > 0:  # the frozen base of a full fine-tune (LoRA's base is the UNet with adapters off)
        base_unet = copy.deepcopy(unet).requires_grad_(False).to(accelerator.device)
    trainable = [p for p in unet.parameters() if p.requires_grad]  # kept in float32; autocast does the rest

    metric = load_metric(args.met3r_factory, args.met3r_kwargs).to(accelerator.device)
    reward = MEt3RReward(metric, pairs=args.met3r_pairs, differentiable=True, chunk_size=args.met3r_chunk_size)

    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    # every call goes through the unwrapped model (K checkpointed calls per backward); under several processes the
    # gradients are averaged explicitly before the optimizer step
    model = accelerator.unwrap_model(unet)
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("met3r-reward", config=config)

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
    validation_log = os.path.join(args.output_dir, "met3r_validation.jsonl")

    def validate(step: int, force: bool = False) -> None:
        with preserved_rng_state():  # validation never changes the training's random numbers
            results = hook.evaluate(step) if force else hook(step)
        if results is not None and accelerator.is_main_process:
            logger.info(f"step {step}: MEt3R {results['score']:.5f} {results['pair_scores']}")
            with open(validation_log, "a") as f:
                f.write(json.dumps({k: v for k, v in results.items() if not torch.is_tensor(v)}) + "\n")

    global_step = 0
    if resume_path is not None:  # "latest" without a complete checkpoint starts from scratch
        global_step = load_checkpoint(accelerator, resume_path)["global_step"]
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
            save_checkpoint(accelerator, args.output_dir, global_step, total_limit=args.checkpoints_total_limit)
        if hook is not None:
            validate(global_step)

    accelerator.wait_for_everyone()
    if hook is not None and not (args.validation_steps and global_step % args.validation_steps == 0):
        validate(global_step, force=True)
    if accelerator.is_main_process:
        save_weights(model, args)
    accelerator.end_training()
    return {"global_step": global_step, "history": history, "validation": hook.history if hook else [],
            "output_dir": args.output_dir}


def save_weights(unet, args: argparse.Namespace) -> None:
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
