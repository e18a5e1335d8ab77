"""Cost of MEt3R scoring / guidance per denoising step, relative to a plain step, and peak memory.

Runs a Stable-Diffusion-shaped pipeline with randomly initialised components (no download) four ways, each for
`--steps` DDIM steps with `--views` views of one prompt and classifier-free guidance:

  plain      StableDiffusionPipeline, no callback
  score      + MEt3RCallback scoring every step (decode x0 + metric forward, no grad)
  guided     + MEt3RCallback with guidance_scale > 0 every step (decode + metric forward/backward through the
             decoder; the approximate guidance)
  exact      pipelines/met3r_guided_multiview.py guiding every step (gradient through the UNet and the decoder)
  exact+ckpt the same with gradient checkpointing

and reports seconds per step, the ratio to a plain step, and the peak memory of each run (CUDA: peak allocated;
CPU: peak resident set size, reset between runs via /proc/self/clear_refs). `--size small` (default) is a reduced
SD-like UNet/VAE at 256x256 that runs on a CPU; `--size sd15` uses Stable Diffusion 1.5's UNet and VAE configs
(random weights, 512x512), meant for a GPU. The metric is `--metric standin` (a small conv-feature consistency
score; cheap, so the numbers isolate the diffusion-side cost), `tiny` (met3r_diffusers.testing's tiny MEt3R) or `met3r`
(`MEt3R()` with its default checkpoints, which downloads them).

    python benchmarks/bench_guidance.py [--size small|sd15] [--steps 4] [--views 4] [--decode-size 128]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from met3r_diffusers.callbacks import MEt3RCallback
from met3r_diffusers.pairs import resolve_pairs

SIZES = {
    "small": {
        "unet": {"block_out_channels": (64, 128, 256), "layers_per_block": 1, "cross_attention_dim": 256,
                 "attention_head_dim": 8, "sample_size": 32,
                 "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
        "vae": {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 1},
        "text_hidden": 256,
        "resolution": 256,
    },
    "sd15": {
        "unet": {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
                 "attention_head_dim": 8, "sample_size": 64,
                 "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3},
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2},
        "text_hidden": 768,
        "resolution": 512,
    },
}


class StandInConsistency(torch.nn.Module):
    """1 - cosine of fixed random conv features of two views (same interface as MEt3R, negligible cost)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 16, 3, padding=1).requires_grad_(False)

    def forward(self, views, pairs="adjacent"):
        batch, num_views = views.shape[:2]
        feats = self.features(views.flatten(0, 1)).unflatten(0, (batch, num_views))
        pair_scores = torch.stack(
            [(1 - F.cosine_similarity(feats[:, i], feats[:, j], dim=1)).mean((-2, -1))
             for i, j in resolve_pairs(pairs, num_views)], 1)
        return type("Output", (), {"score": pair_scores.mean(1), "pair_scores": pair_scores})()


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    from met3r_diffusers.testing import tiny_clip_tokenizer  # offline byte-level CLIP tokenizer

    config = SIZES[size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **config["unet"])
    vae = AutoencoderKL(latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **config["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=config["text_hidden"],
        intermediate_size=4 * config["text_hidden"], num_attention_heads=8, num_hidden_layers=2, vocab_size=514,
        max_position_embeddings=16))
    tokenizer_dir = Path(__import__("tempfile").mkdtemp())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(tokenizer_dir), unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_metric(name: str, device: torch.device):
    if name == "standin":
        torch.manual_seed(0)
        return StandInConsistency().to(device)
    if name == "tiny":
        from met3r_diffusers.testing import tiny_met3r

        return tiny_met3r(seed=0).to(device)
    from met3r_diffusers import MEt3R

    return MEt3R().to(device)


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _time(run, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median wall time of `run()` over `repeats` runs after one warm-up, and the peak memory."""
    run()
    _reset_peak(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], _peak_gib(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--metric", choices=("standin", "tiny", "met3r"), default="standin")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--decode-size", type=int, default=None, help="pixel size of each decoded view for MEt3R")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="half-precision pipeline (GPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if args.fp16 else torch.float32

    pipe = build_pipeline(args.size, device, dtype)
    metric = build_metric(args.metric, device)
    resolution = SIZES[args.size]["resolution"]
    common = {"num_inference_steps": args.steps, "num_images_per_prompt": args.views, "height": resolution,
              "width": resolution, "guidance_scale": 5.0, "output_type": "latent"}

    spec = importlib.util.spec_from_file_location("met3r_guided_multiview", ROOT / "pipelines" /
                                                  "met3r_guided_multiview.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    exact = module.MEt3RGuidedMultiViewPipeline(**{k: pipe.components[k] for k in
                                                   ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    exact.set_progress_bar_config(disable=True)

    def with_callback(guidance_scale):
        def run():
            callback = MEt3RCallback(metric, num_views=args.views, guidance_scale=guidance_scale,
                                     decode_size=args.decode_size)
            with callback.attach(pipe):
                pipe("a chair", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"],
                     generator=torch.Generator(device).manual_seed(0), **common)
        return run

    def exact_run(checkpointing):
        def run():
            exact("a chair", num_views=args.views, num_inference_steps=args.steps, height=resolution,
                  width=resolution, guidance_scale=5.0, metric=metric, met3r_guidance_scale=10.0,
                  met3r_decode_size=args.decode_size, gradient_checkpointing=checkpointing, output_type="latent",
                  generator=torch.Generator(device).manual_seed(0))
        return run

    runs = {
        "plain": lambda: pipe("a chair", generator=torch.Generator(device).manual_seed(0), **common),
        "score": with_callback(0.0),
        "guided": with_callback(0.1),
        "exact": exact_run(False),
        "exact+ckpt": exact_run(True),
    }
    print(f"device {device} ({args.threads} threads on CPU), size {args.size} ({resolution}px), {args.views} views, "
          f"{args.steps} DDIM steps with CFG, metric {args.metric}, decode size {args.decode_size or 'native'}")
    results = {}
    for name, run in runs.items():
        seconds, peak = _time(run, device, args.repeats)
        results[name] = {"s_per_step": seconds / args.steps, "peak_gib": peak}
    plain = results["plain"]["s_per_step"]
    print(f"{'run':<11} {'s/step':>8} {'x plain':>8} {'peak GiB':>9}")
    for name, result in results.items():
        result["relative"] = result["s_per_step"] / plain
        print(f"{name:<11} {result['s_per_step']:8.3f} {result['relative']:8.2f} {result['peak_gib']:9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
