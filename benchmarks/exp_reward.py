"""Experiment: what does reward fine-tuning with MEt3R (DRaFT-K) do to the samples, and what does it cost per step?

Procedure (CPU, tiny components, toy data; every number printed comes from this run):

1. write a procedural toy multi-view dataset (`make_toy_multiview_dataset`) and a held-out one (other seed);
2. build the tiny UNet/VAE/CLIP of the training scripts, fit the VAE to the toy views (so that decoded samples are
   images), save everything as a local diffusers model folder and pre-train the UNet with the diffusion loss only
   (training/train_met3r_finetune.py, λ = 0) -> the "base" model;
3. reward fine-tune the base model (training/train_met3r_reward.py, full UNet) with identical seeds and prompts:
   without guards, with --kl_weight, and with --kl_weight plus --diffusion_loss_weight;
4. sample the same prompts with the same seeds (DDIM, classifier-free guidance, as in training) from the base and
   every fine-tuned UNet and report (a) the optimised metric, (b) consistency measures that were not optimised
   (the toy metric with other random features; MEt3R's pipeline on plane geometry with other features and the
   mse distance), (c) image statistics and the mean pixel difference of adjacent views next to those of the real
   toy views, and the diffusion loss on held-out scenes;
5. time and peak memory (the child process's peak RSS) per training step for K = 1, 2, 4.

    python benchmarks/exp_reward.py
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_parser, fit_vae, load_training_script

OPTIMISED = "met3r_diffusers.testing:FeatureConsistencyMetric"


def sample(script, unet, parts: dict, prompts: list[str], seeds: list[int], options) -> "torch.Tensor":
    """DDIM + CFG samples (n, V, 3, H, W), one seed per prompt, exactly the training script's sampler."""
    import torch
    from diffusers import DDIMScheduler

    from met3r_diffusers.diffusion import ViewLayout, decode_views

    scheduler = DDIMScheduler.from_config(parts["scheduler"].config)
    scheduler.set_timesteps(options.num_inference_steps)
    v = options.num_views
    shape = (v, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        context = script.text_embeddings(prompts, parts["tokenizer"], parts["text_encoder"], unet, "cpu")
        uncond = script.text_embeddings([""], parts["tokenizer"], parts["text_encoder"], unet, "cpu")
        context = context.repeat_interleave(v, 0)
        labels = script.view_labels(unet, len(prompts), v, "cpu")
        denoise = script.guided_denoiser(unet.eval(), scheduler, context, uncond.expand(len(context), -1, -1),
                                         labels, options.cfg_scale)
        latents, _, _ = script.sample_latents(denoise, scheduler, latents, 1)
        return decode_views(parts["vae"], latents, ViewLayout("batch", v)).float()


def heldout_diffusion_loss(script, unet, parts: dict, dataset, draws: int, seed: int) -> float:
    """Mean epsilon-MSE over held-out scenes, `draws` fixed (timestep, noise) draws per scene."""
    import torch
    import torch.nn.functional as F

    from met3r_diffusers.data import collate_multiview

    generator = torch.Generator().manual_seed(seed)
    scheduler, vae = parts["scheduler"], parts["vae"]
    batch = collate_multiview([dataset[k] for k in range(len(dataset))])
    num_views = batch["pixel_values"].shape[1]
    losses = []
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"].flatten(0, 1)).latent_dist.mean * vae.config.scaling_factor
        context = script.text_embeddings(batch["prompt"], parts["tokenizer"], parts["text_encoder"], unet, "cpu")
        context = context.repeat_interleave(num_views, 0)
        labels = script.view_labels(unet, len(dataset), num_views, "cpu")
        for _ in range(draws):
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(dataset),), generator=generator)
            t = t.repeat_interleave(num_views)
            prediction = unet(scheduler.add_noise(latents, noise, t), t, context, class_labels=labels).sample
            losses.append(F.mse_loss(prediction, noise).item())
    return sum(losses) / len(losses)


def measure(views, metrics: dict) -> dict:
    """Scores of every measure (mean over samples) and the image statistics of views (B, V, 3, H, W)."""
    import torch

    from met3r_diffusers.rewards import image_statistics

    row = {}
    for name, metric in metrics.items():
        with torch.no_grad():
            scores = metric(views, pairs="adjacent").score
        row[name] = float(scores[torch.isfinite(scores)].mean())
    row.update({k: float(v.mean()) for k, v in image_statistics(views).items()})
    # how different adjacent views are (mean absolute pixel difference): 0 for identical views, a collapse that
    # every consistency measure rewards
    row["view_difference"] = float((views[:, 1:] - views[:, :-1]).abs().mean())
    return row


def time_per_step(data_dir: Path, base: Path, work: Path, k: int, options) -> dict:
    """Run a few reward steps with K = k in a child process: median seconds per step (first excluded), peak RSS."""
    output = work / f"timing_k{k}"
    code = (
        "import json, sys, torch; torch.set_num_threads(1); sys.path.insert(0, %r)\n"
        "from common import load_training_script; s = load_training_script('train_met3r_reward')\n"
        "r = s.main(s.parse_args(json.loads(sys.argv[1])))\n"
        "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(json.dumps({'seconds': [h['step_seconds'] for h in r['history']], 'peak_kib': int(peak)}))\n"
    ) % str(Path(__file__).resolve().parent)
    argv = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data_dir), "--output_dir",
            str(output), "--max_train_steps", str(options.timing_steps), "--truncation_steps", str(k),
            "--num_inference_steps", str(options.num_inference_steps), "--cfg_scale", str(options.cfg_scale),
            "--train_batch_size", "2", "--kl_weight", "1", "--met3r_factory", OPTIMISED,
            "--met3r_kwargs", '{"shift": 1}', "--report_to", "none", "--checkpointing_steps", "100000",
            "--num_validation_prompts", "0"]
    result = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True,
                            check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {"K": k, "seconds": statistics.median(report["seconds"][1:]), "peak_mib": report["peak_kib"] / 1024}


def main() -> None:
    """Run the experiment and print its tables (see the module docstring)."""
    parser = experiment_parser(__doc__.split("\n\n")[0], vae_steps=600)
    parser.add_argument("--reward_steps", type=int, default=80)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--truncation_steps", type=int, default=2, help="K of the fine-tuning runs")
    parser.add_argument("--num_inference_steps", type=int, default=8)
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--kl_weight", type=float, default=10.0, help="the guarded runs' --kl_weight")
    parser.add_argument("--diffusion_loss_weight", type=float, default=1.0)
    parser.add_argument("--num_eval_seeds", type=int, default=2, help="fixed seeds per evaluation prompt")
    parser.add_argument("--timing_steps", type=int, default=4)
    options = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    from met3r_diffusers.data import MultiViewFolderDataset, make_toy_multiview_dataset
    from met3r_diffusers.testing import (
        FeatureConsistencyMetric,
        reset_accelerate_state,
        tiny_met3r,
        tiny_training_components,
    )

    torch.set_num_threads(1)
    start = time.perf_counter()
    finetune, reward_script = load_training_script("train_met3r_finetune"), load_training_script("train_met3r_reward")
    work = Path(options.work_dir or tempfile.mkdtemp(prefix="met3r-reward-exp-"))
    data_dir = make_toy_multiview_dataset(work / "data", num_scenes=options.num_scenes, num_views=options.num_views,
                                          resolution=options.resolution, seed=0)
    heldout = MultiViewFolderDataset(make_toy_multiview_dataset(work / "heldout", num_scenes=8,
                                                                num_views=options.num_views,
                                                                resolution=options.resolution, seed=1))
    dataset = MultiViewFolderDataset(data_dir)
    real_views = torch.stack([dataset[k]["pixel_values"] for k in range(len(dataset))])

    # 2. the base model
    base = work / "base"
    parts = tiny_training_components(options.resolution, options.num_views, seed=0, prediction_type="epsilon")
    vae_error = fit_vae(parts["vae"], real_views.flatten(0, 1), options.vae_steps, seed=0)
    for name, component in parts.items():
        component.save_pretrained(base / name)
    reset_accelerate_state()
    finetune.main(finetune.parse_args([
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data_dir), "--output_dir",
        str(work / "pretrain"), "--met3r_weight", "0", "--max_train_steps", str(options.base_steps),
        "--train_batch_size", "2", "--learning_rate", "3e-4", "--report_to", "none", "--checkpointing_steps",
        "100000", "--num_validation_samples", "0", "--met3r_factory", OPTIMISED]))
    shutil.rmtree(base / "unet")
    shutil.copytree(work / "pretrain" / "unet", base / "unet")
    print(f"VAE {options.vae_steps} steps (reconstruction MSE {vae_error:.4f}); base UNet {options.base_steps} steps "
          f"({time.perf_counter() - start:.0f} s so far)")

    # 3. reward fine-tuning from the base, identical seeds
    runs = {"base": None, "reward only": (0.0, 0.0), f"+ KL {options.kl_weight:g}": (options.kl_weight, 0.0),
            f"+ KL {options.kl_weight:g} + diffusion {options.diffusion_loss_weight:g}":
                (options.kl_weight, options.diffusion_loss_weight)}
    trained = {}
    for name, weights in runs.items():
        if weights is None:
            continue
        reset_accelerate_state()
        run_start = time.perf_counter()
        result = reward_script.main(reward_script.parse_args([
            "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data_dir), "--output_dir",
            str(work / f"reward_{len(trained)}"), "--max_train_steps", str(options.reward_steps),
            "--truncation_steps", str(options.truncation_steps), "--num_inference_steps",
            str(options.num_inference_steps), "--cfg_scale", str(options.cfg_scale), "--train_batch_size", "2",
            "--learning_rate", str(options.learning_rate), "--kl_weight", str(weights[0]),
            "--diffusion_loss_weight", str(weights[1]), "--met3r_factory", OPTIMISED, "--met3r_kwargs",
            '{"shift": 1}', "--report_to", "none", "--checkpointing_steps", "100000", "--num_validation_prompts",
            "0", "--seed", "0"]))
        history = result["history"]
        trained[name] = {"dir": Path(result["output_dir"]) / "unet", "seconds": time.perf_counter() - run_start,
                         "first": history[0], "last": history[-1]}
        print(f"{name}: reward {history[0]['reward']:.4f} -> {history[-1]['reward']:.4f}, "
              f"KL {history[-1]['kl']:.4g}, contrast {history[0]['stats/contrast']:.4f} -> "
              f"{history[-1]['stats/contrast']:.4f} ({trained[name]['seconds']:.0f} s)")

    # 4. fixed-seed samples of every model
    metrics = {"optimised": FeatureConsistencyMetric(shift=1),
               "toy, other features": FeatureConsistencyMetric(shift=1, seed=1),
               "MEt3R plane/mse": tiny_met3r(seed=1, distance="mse")}
    prompts = reward_script.read_prompts(argparse.Namespace(prompts_file=None), dataset)
    eval_prompts = [p for p in prompts[:8] for _ in range(options.num_eval_seeds)]
    seeds = [1000 + k for k in range(len(eval_prompts))]
    rows = {"real toy views": {**measure(real_views, metrics), "heldout": math.nan}}
    for name in runs:
        unet = UNet2DConditionModel.from_pretrained(base / "unet" if name == "base" else trained[name]["dir"])
        views = sample(reward_script, unet, parts, eval_prompts, seeds, options)
        rows[name] = {**measure(views, metrics), "heldout": heldout_diffusion_loss(reward_script, unet, parts, heldout, 8, 0)}

    # 5. cost per step for K = 1, 2, 4
    timing = [time_per_step(data_dir, base, work, k, options) for k in (1, 2, 4)]

    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\n{options.num_scenes} toy scenes x {options.num_views} views at {options.resolution} px; VAE "
          f"{options.vae_steps} steps, base {options.base_steps} steps; reward fine-tuning {options.reward_steps} steps "
          f"(full UNet, AdamW {options.learning_rate:g}, 2 prompts/step, DDIM {options.num_inference_steps} steps, "
          f"cfg {options.cfg_scale:g}, K = {options.truncation_steps}); evaluation on {len(eval_prompts)} fixed-seed "
          f"samples ({options.num_eval_seeds} seeds x 8 prompts); CPU: {cpu}, {torch.get_num_threads()} threads")
    print("| model | optimised metric ↓ | toy, other features ↓ | MEt3R plane/mse ↓ | contrast | saturation | "
          "mean RGB | adjacent-view difference | held-out diffusion loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['optimised']:.4f} | {row['toy, other features']:.4f} | {row['MEt3R plane/mse']:.4f} "
              f"| {row['contrast']:.4f} | {row['saturation']:.4f} | {row['mean_red']:.3f} / {row['mean_green']:.3f} / "
              f"{row['mean_blue']:.3f} | {row['view_difference']:.4f} | {row['heldout']:.4f} |")
    print("\n| run | reward, step 1 -> last | KL at last step | contrast in training, step 1 -> last | time (s) |")
    print("|---|---|---|---|---|")
    for name, run in trained.items():
        print(f"| {name} | {run['first']['reward']:.4f} -> {run['last']['reward']:.4f} | {run['last']['kl']:.4g} | "
              f"{run['first']['stats/contrast']:.4f} -> {run['last']['stats/contrast']:.4f} | {run['seconds']:.0f} |")
    print("\n| K | seconds per step (median) | peak RSS of the process (MiB) |")
    print("|---|---|---|")
    for row in timing:
        print(f"| {row['K']} | {row['seconds']:.3f} | {row['peak_mib']:.0f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if options.work_dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
