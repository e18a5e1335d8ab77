"""Seconds per pair, FLOPs and peak memory of the whole MEt3R metric on CPU, per stage, eager and compiled.

Full-size MASt3R + DINO/FeatUp with the deterministic stand-in weights of ../shared/parity (no
download; MET3R_PARITY_DIR overrides the location). Usage:

    python benchmarks/bench_metric.py [--threads 2] [--repeats 2] [--size 256] [--views 2 8] [--bf16]
                                      [--backward] [--no-compile]

For each V it scores one sample of V random views (pairs "adjacent": V - 1 pairs) under
`torch.inference_mode` and prints, per stage and for the whole forward: the median time per
sample, its FLOPs, the float32 and bf16 floors (FLOPs / the matmul rate probed in this process
around the measurement; benchmarks/common.py) and the ratio to each. Stages: geometry (MASt3R
encoder once per view + decoder/heads once per pair), features (DINO + FeatUp once per view; the
JBU FLOPs counted by hand), render+score (the rest of the forward: splatting both clouds of every
pair and the masked cosine; no matmul FLOPs). Then the per-pair time and the peak resident memory
of the forward (VmHWM reset before it; weights and runtime included). `--bf16` stores the weights
in bf16 and runs under CPU bf16 autocast, as the CLI's `--bf16` does (rendering and score stay
float32). `--backward` adds forward+backward w.r.t. the images at V=2. Afterwards the same rows with
`MEt3R(compile=True)`'s compilation (`compile_units`), and the compile time of the first call.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_features import jbu_gflop
from common import (
    compile_in_place,
    count_gflop,
    cpu_model,
    reset_peak,
    rss_gib,
    stage_line,
    standin_featup,
    standin_model,
    timed,
)

from met3r_diffusers import MEt3R
from met3r_diffusers.pairs import resolve_pairs


def _feature_gflop(metric: MEt3R, num_views: int, size: int) -> float:
    """DINO (counted) + the JBU stack (by hand) for `num_views` views."""
    images = torch.zeros(1, 3, size, size, dtype=metric.dtype)  # bf16 with --bf16's bf16 weights
    dino = count_gflop(lambda: metric.feature_backbone.low_res(images))
    low = size // 16
    channels = metric.feature_backbone.dim
    jbu = 2 * channels**2 * low * low / 1e9 + sum(sum(jbu_gflop(low << k, low << k, channels)) for k in range(1, 5))
    return num_views * (dino + jbu)


def _report(metric: MEt3R, num_views: int, size: int, repeats: int, bf16: bool, backward: bool, tag: str) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, num_views, 3, size, size, generator=generator) * 2 - 1
    pairs = resolve_pairs("adjacent", num_views)
    num_pairs = len(pairs)

    def run(fn, *args) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fn(*args)

    def forward_backward() -> None:
        views = images.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            metric(views, pairs).score.sum().backward()

    geometry_gflop = count_gflop(lambda: run(metric.compute_geometry, images, pairs))
    feature_gflop = _feature_gflop(metric, num_views, size)
    print(f"{tag}, V={num_views} adjacent ({num_pairs} pairs){', --bf16' if bf16 else ''}, per sample:")
    geometry = timed(lambda: run(metric.compute_geometry, images, pairs), repeats)
    print("    " + stage_line("geometry", geometry, geometry_gflop))
    features = timed(lambda: run(metric.compute_features, images), repeats)
    print("    " + stage_line("features", features, feature_gflop))
    reset_peak()
    total = timed(lambda: run(metric, images, pairs), repeats)
    peak = rss_gib("VmHWM")
    rest = total.seconds - geometry.seconds - features.seconds
    print(f"    {'render+score (total - geometry - features)':44s} {rest:7.3f} s")
    print("    " + stage_line("whole forward", total, geometry_gflop + feature_gflop))
    print(f"    => {total.seconds / num_pairs:.2f} s per pair; peak RSS of the forward {peak:.2f} GiB")
    if backward:
        timing = timed(forward_backward, repeats)
        print("    " + stage_line("forward+backward w.r.t. the images", timing, geometry_gflop + 3 * feature_gflop)
              + f" | {timing.seconds / total.seconds:.2f}x the forward")


def main() -> None:
    """Run the benchmark: every V eager, then every V compiled."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--views", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--bf16", action="store_true", help="bf16 weights + CPU bf16 autocast (the CLI's --bf16)")
    parser.add_argument("--backward", action="store_true", help="also forward+backward w.r.t. the images at V=2")
    parser.add_argument("--chunk-size", type=int, default=2, help="MEt3R(chunk_size=...); 0 = everything at once")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    metric = MEt3R(img_size=None, backbone=standin_model("mast3r"), feature_backbone=standin_featup(),
                   chunk_size=args.chunk_size or None)
    if args.bf16:
        metric.to(torch.bfloat16)
    reset_peak()
    print(f"MEt3R (full-size MASt3R + DINO/FeatUp stand-in weights) built in {time.perf_counter() - start:.1f} s; "
          f"{cpu_model()}; {args.size}x{args.size}, chunk_size {args.chunk_size}; "
          f"RSS after loading {rss_gib('VmRSS'):.2f} GiB")
    passes = [("eager", False)] + ([] if args.no_compile else [("compiled", True)])
    for tag, compiled in passes:
        if compiled:
            compile_in_place(metric)
            images = torch.rand(1, 2, 3, args.size, args.size) * 2 - 1
            start = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                metric(images)
            print(f"compile time (first compiled V=2 call, including one forward): {time.perf_counter() - start:.1f} s")
        for num_views in args.views:
            _report(metric, num_views, args.size, args.repeats, args.bf16, args.backward and num_views == 2, tag)


if __name__ == "__main__":
    main()
