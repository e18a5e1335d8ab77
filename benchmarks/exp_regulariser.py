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

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_parser, fit_vae, load_training_script


def main() -> None:
    parser = experiment_parser(__doc__.split("\n\n")[0], vae_steps=1500)
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

    from met3r_diffusers.data import MultiViewFolderDataset, make_toy_multiview_dataset
    from met3r_diffusers.testing import reset_accelerate_state, tiny_training_components

    torch.set_num_threads(2)
    script = load_training_script("train_met3r_finetune")
    work = Path(options.work_dir or tempfile.mkdtemp(prefix="met3r-exp-"))
    data_dir = make_toy_multiview_dataset(work / "data", num_scenes=options.num_scenes, num_views=options.num_views,
                                          resolution=options.resolution, seed=0)

    def run(output_dir: Path, *extra: str) -> dict:
        reset_accelerate_state()
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
    dataset = MultiViewFolderDataset(data_dir)
    images = torch.cat([dataset[k]["pixel_values"] for k in range(len(dataset))])  # (N*V, 3, H, W)
    vae_error = fit_vae(components["vae"], images, options.vae_steps, seed=0)
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
