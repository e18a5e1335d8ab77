"""Experiment: does fine-tuning with the MEt3R regulariser (λ > 0) lower the MEt3R of sampled views vs λ = 0?

Procedure (CPU, tiny random components, toy data; every number printed comes from this run):

1. write a procedural toy multi-view dataset (`make_toy_multiview_dataset`);
2. build the tiny UNet/VAE/CLIP of the training script, train the VAE to reconstruct the toy views (so that decoded
   samples are images, not the output of a random decoder), save everything as a local diffusers model folder and
   pre-train the UNet on the toy data with the diffusion loss only (λ = 0) -> the "base" model;
3. fine-tune the base model twice with identical seeds, data order and step count, once with λ = 0 and once with
   λ > 0 (timestep gate t <= --max_timestep);
4. sample the same validation prompts with the same seeds from the base and both fine-tuned UNets (DDIM, through the
   script's MEt3REvalHook) and report their MEt3R (lower = more consistent) and the final diffusion loss.

    python benchmarks/exp_regulariser.py                       # toy stand-in metric (no weights needed)
    python benchmarks/exp_regulariser.py --met3r_factory met3r_diffusers.testing:tiny_met3r --met3r_kwargs '{"seed": 0}'
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _script():
    path = REPO_ROOT / "training" / "train_met3r_finetune.py"
    spec = importlib.util.spec_from_file_location("train_met3r_finetune", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _train_vae(vae, data_dir: Path, steps: int, seed: int) -> float:
    """Fit the tiny VAE to the toy views (MSE + a small KL term); sets its scaling_factor to 1 / latent std."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from met3r_diffusers.data import MultiViewFolderDataset

    dataset = MultiViewFolderDataset(data_dir)
    images = torch.cat([dataset[k]["pixel_values"] for k in range(len(dataset))])  # (N*V, 3, H, W)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    vae.train()
    for _ in tqdm(range(steps), desc="VAE"):
        batch = images[torch.randint(len(images), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample(generator)).sample, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        error = F.mse_loss(vae.decode(posterior.mean).sample, images).item()
        vae.register_to_config(scaling_factor=float(1 / posterior.mean.std()))
    return error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=str, default=None, help="default: a temporary folder (deleted)")
    parser.add_argument("--num_scenes", type=int, default=16)
    parser.add_argument("--num_views", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--vae_steps", type=int, default=1500)
    parser.add_argument("--base_steps", type=int, default=600)
    parser.add_argument("--finetune_steps", type=int, default=200)
    parser.add_argument("--met3r_weight", type=float, default=1.0, help="λ of the regularised run")
    parser.add_argument("--max_timestep", type=int, default=600)
    parser.add_argument("--num_validation_samples", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--met3r_factory", type=str,
                        default="met3r_diffusers.testing:FeatureConsistencyMetric")
    parser.add_argument("--met3r_kwargs", type=str, default='{"shift": 1}')
    options = parser.parse_args()

    import torch

    from met3r_diffusers.data import make_toy_multiview_dataset
    from met3r_diffusers.testing import tiny_training_components

    torch.set_num_threads(2)
    script = _script()
    work = Path(options.work_dir or tempfile.mkdtemp(prefix="met3r-exp-"))
    data_dir = make_toy_multiview_dataset(work / "data", num_scenes=options.num_scenes, num_views=options.num_views,
                                          resolution=options.resolution, seed=0)

    def run(output_dir: Path, *extra: str) -> dict:
        _reset_accelerate()
        argv = ["--train_data_dir", str(data_dir), "--output_dir", str(output_dir), "--train_batch_size", "2",
                "--learning_rate", "3e-4", "--report_to", "none", "--checkpointing_steps", "100000",
                "--num_validation_samples", str(options.num_validation_samples), "--validation_inference_steps", "20",
                "--validation_batch_size", "4", "--met3r_factory", options.met3r_factory,
                "--met3r_kwargs", options.met3r_kwargs, "--met3r_max_timestep", str(options.max_timestep), *extra]
        start = time.perf_counter()
        result = script.main(script.parse_args(argv))
        result["seconds"] = time.perf_counter() - start
        return result

    # 2. the base model: tiny components saved as a local diffusers folder, then pre-trained with λ = 0
    base = work / "base"
    components = tiny_training_components(options.resolution, options.num_views, seed=0, prediction_type="epsilon")
    vae_error = _train_vae(components["vae"], data_dir, options.vae_steps, seed=0)
    print(f"VAE: {options.vae_steps} steps, reconstruction MSE {vae_error:.4f} (images in [-1, 1])")
    for name, component in components.items():
        component.save_pretrained(base / name)
    pretrain = run(work / "pretrain", "--pretrained_model_name_or_path", str(base), "--met3r_weight", "0",
                   "--max_train_steps", str(options.base_steps))
    shutil.rmtree(base / "unet")
    shutil.copytree(work / "pretrain" / "unet", base / "unet")
    print(f"base model: {options.base_steps} steps in {pretrain['seconds']:.0f} s, "
          f"MEt3R of samples {pretrain['validation'][-1]['score']:.4f}")

    # 3-4. fine-tune with λ = 0 and λ > 0 from the same base, same seeds
    rows = []
    for seed in options.seeds:
        for weight in (0.0, options.met3r_weight):
            result = run(work / f"ft_seed{seed}_lambda{weight}", "--pretrained_model_name_or_path", str(base),
                         "--met3r_weight", str(weight), "--max_train_steps", str(options.finetune_steps),
                         "--seed", str(seed))
            rows.append({"seed": seed, "lambda": weight, "met3r": result["validation"][-1]["score"],
                         "pairs": result["validation"][-1]["pair_scores"],
                         "diffusion_loss": result["final_diffusion_loss"], "seconds": result["seconds"]})
            print(json.dumps(rows[-1]))

    print(f"\n{options.num_scenes} toy scenes x {options.num_views} views at {options.resolution}px; base "
          f"{options.base_steps} steps (VAE {options.vae_steps}), fine-tune {options.finetune_steps} steps, "
          f"gate t <= {options.max_timestep}; "
          f"MEt3R of {options.num_validation_samples} sampled validation scenes (DDIM 20 steps); metric "
          f"{options.met3r_factory.rsplit('/', 1)[-1]} {options.met3r_kwargs}")
    print("| seed | λ | MEt3R of samples ↓ | diffusion loss (last 50 steps) | time (s) |")
    print("|---|---|---|---|---|")
    print(f"| - | base | {pretrain['validation'][-1]['score']:.4f} | {pretrain['final_diffusion_loss']:.4f} | "
          f"{pretrain['seconds']:.0f} |")
    for row in rows:
        print(f"| {row['seed']} | {row['lambda']:g} | {row['met3r']:.4f} | {row['diffusion_loss']:.4f} | "
              f"{row['seconds']:.0f} |")
    for seed in options.seeds:
        plain, regularised = (r["met3r"] for r in rows if r["seed"] == seed)
        print(f"seed {seed}: λ={options.met3r_weight:g} changes MEt3R by {regularised - plain:+.4f} "
              f"({(regularised - plain) / plain:+.1%}) relative to λ=0")
    if options.work_dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
