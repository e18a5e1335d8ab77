"""Seconds per pair and peak memory of the whole MEt3R metric on CPU, with a per-stage breakdown.

Full-size MASt3R + DINO/FeatUp with the deterministic stand-in weights of ../shared/parity (no
download; MET3R_PARITY_DIR overrides the location). Usage:

    python benchmarks/bench_metric.py [--threads 2] [--repeats 2] [--size 256] [--views 2 8] [--bf16]

For each V it scores one sample of V random views (pairs "adjacent": V - 1 pairs) under
`torch.inference_mode` and prints the median forward time per pair, the time of each stage
(geometry: MASt3R encoder once per view + decoder/head once per pair; features: DINO + FeatUp once
per view; render+score: splatting both clouds of every pair and the masked cosine), and the peak
resident memory (VmHWM, reset before each setting; includes weights and the PyTorch runtime).
`--bf16` runs under CPU bf16 autocast (the renderer and score always run in float32).
It also counts the FLOPs of the geometry stage (MASt3R's linear layers, attention and
convolutions) and measures the machine's float32 matmul rate at that moment: their ratio is a
float32 time per pair that no implementation of the same network can beat on this machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dust3r import PARITY_DIR, matmul_rate, reset_peak, rss_gib, standin_model

from met3r_diffusers import MEt3R
from met3r_diffusers.models import DinoFeatUp
from met3r_diffusers.pairs import resolve_pairs


def _standin_featup() -> DinoFeatUp:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("_parity_weights", PARITY_DIR / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    manifest = json.loads((PARITY_DIR / "featup" / "dino16_jbu.manifest.json").read_text())
    model = DinoFeatUp()
    model.load_state_dict(weights.make_state_dict(manifest["tensors"], seed=0))
    return model.eval()


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _measure(metric: MEt3R, num_views: int, size: int, repeats: int, bf16: bool) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, num_views, 3, size, size, generator=generator) * 2 - 1
    pairs = resolve_pairs("adjacent", num_views)
    stages: dict[str, list[float]] = {"total": [], "geometry": [], "features": [], "render+score": []}
    peak = 0.0
    for _ in range(repeats + 1):  # the first run is a warm-up
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            reset_peak()  # the peak is that of the whole forward alone
            output, total = _timed(metric, images, pairs)
            peak = max(peak, rss_gib("VmHWM"))
            del output
            (points, conf), geometry = _timed(metric._geometry, images, pairs)
            features, feature_time = _timed(metric._features, images)
            _, render = _timed(metric._score_pairs, images, features, points, conf, pairs, False)
            del points, conf, features
        for key, value in zip(stages, (total, geometry, feature_time, render)):
            stages[key].append(value)
    result = {key: statistics.median(values[1:]) for key, values in stages.items()}
    result["peak_rss_gib"] = peak
    return result


def _geometry_gflop(metric: MEt3R, num_views: int, size: int, bf16: bool) -> float:
    """GFLOP of the geometry stage on one sample of `num_views` views, adjacent pairs.

    (Only this stage: the counter would count FeatUp's sparse products as dense ones.)
    """
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.zeros(1, num_views, 3, size, size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast, FlopCounterMode(display=False) as counter:
        metric._geometry(images, resolve_pairs("adjacent", num_views))
    return counter.get_total_flops() / 1e9


def main() -> None:
    """Run the benchmark and print one block per number of views."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--views", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--bf16", action="store_true", help="CPU bf16 autocast for the networks")
    parser.add_argument("--bf16-weights", action="store_true",
                        help="with --bf16: also store the weights in bf16 (metric.to(torch.bfloat16))")
    parser.add_argument("--chunk-size", type=int, default=2, help="MEt3R(chunk_size=...); 0 = everything at once")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    metric = MEt3R(img_size=None, backbone=standin_model("mast3r"), feature_backbone=_standin_featup(),
                   chunk_size=args.chunk_size or None)
    if args.bf16_weights:
        if not args.bf16:
            parser.error("--bf16-weights needs --bf16 (bf16 weights run under autocast)")
        metric.to(torch.bfloat16)
        reset_peak()
    print(f"MEt3R (full-size MASt3R + DINO/FeatUp stand-in weights) built in {time.perf_counter() - start:.1f} s; "
          f"torch {torch.__version__}, {args.threads} threads, {args.size}x{args.size}, chunk_size {args.chunk_size}"
          f"{', bf16 autocast' if args.bf16 else ''}{', bf16 weights' if args.bf16_weights else ''}; "
          f"RSS after loading {rss_gib('VmRSS'):.2f} GiB")
    for num_views in args.views:
        result = _measure(metric, num_views, args.size, args.repeats, args.bf16)
        num_pairs = num_views - 1
        print(f"V={num_views} adjacent ({num_pairs} pairs): {result['total'] / num_pairs:.2f} s/pair "
              f"({result['total']:.2f} s per sample), peak RSS {result['peak_rss_gib']:.2f} GiB")
        print("    stages per sample: " + ", ".join(
            f"{key} {result[key]:.2f} s" for key in ("geometry", "features", "render+score")))
        gflop = _geometry_gflop(metric, num_views, args.size, args.bf16) / num_pairs
        rate = matmul_rate()
        print(f"    geometry {gflop:.0f} GFLOP per pair; float32 matmul rate now {rate:.0f} GFLOP/s, "
              f"so geometry alone takes >= {gflop / rate:.2f} s/pair in float32 at that rate")


if __name__ == "__main__":
    main()
