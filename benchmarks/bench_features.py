"""Time, FLOPs and peak memory of the DINO ViT-S/16 + FeatUp JBU feature stage (`DinoFeatUp`).

Workload: MEt3R's feature stage on 256x256 images (ImageNet-normalised random images, guidance =
the normalised image), stand-in weights (deterministic, same shapes as the official checkpoint;
the parity fixtures' `weights.py`), float32, CPU, parameters frozen.

Part 1, per stage of one view (inference mode), eager and then compiled (`compile_units`: DINO
blocks and JBU stages): DINO, each JBU stage's kernel construction and its adaptive convolution
(bicubic pre-upsampling + 7x7 per-pixel kernels), and the whole view; each with its FLOPs, the
float32 / bf16 floors from the matmul rate probed in this process around the measurement, and
the ratio (see benchmarks/common.py). The JBU FLOPs are counted by hand (the FLOP counter would
count the sparse products as dense ones); those stages are memory-bound, so their matmul floor
is a loose bound.

Part 2, memory (eager): forward (no autograd) and forward+backward (gradient of `sum(features * G)`
w.r.t. the input image; G in channels-last memory, as the metric's gradient arrives) for a batch of 1
and of 2, each in a fresh subprocess so that its peak resident set size (`ru_maxrss`) is its own;
"extra" is that peak minus the resident size after the model and the inputs are built.

Anchors (original FeatUp + MEt3R on this machine kind, with FeatUp's CPU op vectorised): 4.1 s
forward (batch 1), 7.7 s forward (batch 2), 11.5 s forward+backward (batch 1); extra peak memory
1.7 GB (batch 2 forward) and 3.1 GB (batch 2 forward+backward).

    python benchmarks/bench_features.py [--repeats 3] [--threads 2] [--size 256] [--no-compile] [--no-memory]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compile_in_place, count_gflop, cpu_model, stage_line, standin_featup, timed

from met3r_diffusers.models import DinoFeatUp
from met3r_diffusers.models.featup import IMAGENET_MEAN, IMAGENET_STD

CASES = [("forward", 1), ("forward", 2), ("forward+backward", 1), ("forward+backward", 2)]
KEY_DIM, TAPS, RADIUS = 32, 49, 3


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def jbu_gflop(height: int, width: int, channels: int) -> tuple[float, float]:
    """(kernel construction, adaptive convolution) GFLOP of one JBU stage with a (height, width) output."""
    pixels, size = height * width, 2 * RADIUS + 1
    kernel = pixels * 2 * (3 * KEY_DIM + KEY_DIM * KEY_DIM + TAPS * KEY_DIM + (TAPS + 3) * TAPS + TAPS * TAPS)
    # the forward folds resize + padding + window into 49 taps over the source map: folding the kernels
    # (two 7x7x7 contractions per pixel), then the gather (49 taps x channels per pixel)
    fold = pixels * 2 * 2 * size**3
    conv = fold + 2 * channels * pixels * TAPS
    return kernel / 1e9, conv / 1e9


def _inputs(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # G in channels-last memory, as the metric's gradient arrives (it reads the features as (B, H*W, C))
    return (torch.rand(batch, 3, size, size) - mean) / std, torch.randn(batch, size, size, 384).permute(0, 3, 1, 2)


def stage_breakdown(model: DinoFeatUp, size: int, repeats: int, tag: str) -> None:
    """Print one row per stage of one view's features, and one for the whole view."""
    images, _ = _inputs(1, size)
    with torch.inference_mode():
        low_res = model.low_res(images)
    rows: list[tuple[str, Callable[[], object], float]] = [
        ("DINO ViT-S/16", lambda: model.low_res(images), count_gflop(lambda: model.low_res(images)))]
    stack = model.upsampler
    # eval mode: the fixup's channel mix (I + 0.1 W) runs first, at the lowest resolution
    source = low_res
    mix_gflop = 2 * low_res.shape[1] ** 2 * low_res.shape[-2] * low_res.shape[-1] / 1e9
    total_jbu = mix_gflop
    for k, stage in enumerate((stack.up1, stack.up2, stack.up3, stack.up4), 1):
        height, width = 2 * source.shape[-2], 2 * source.shape[-1]
        pooled = F.adaptive_avg_pool2d(images, (height, width))
        kernel_gflop, conv_gflop = jbu_gflop(height, width, source.shape[1])
        total_jbu += kernel_gflop + conv_gflop
        rows.append((f"JBU up{k} kernel ({height}x{width})", lambda s=stage, g=pooled: s.kernel(g), kernel_gflop))
        rows.append((f"JBU up{k} kernel+conv", lambda s=stage, x=source, g=pooled: s(x, g), kernel_gflop + conv_gflop))
        with torch.inference_mode():
            source = stage(source, pooled)
    rows.append(("JBU stack (4 stages + fixup)", lambda: model.upsample(low_res, images), total_jbu))
    rows.append(("whole view (DINO + JBU)", lambda: model(images), rows[0][2] + total_jbu))
    print(f"{tag}, one {size}x{size} view, inference mode:")
    for label, fn, gflop in rows:
        def run(fn: Callable[[], object] = fn) -> None:
            with torch.inference_mode():
                fn()
        print("    " + stage_line(label, timed(run, repeats), gflop))


def run_case(mode: str, batch: int, size: int, repeats: int, threads: int) -> dict:
    """Time and extra peak memory of one memory case (run in its own subprocess)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = standin_featup()
    images, weights = _inputs(batch, size)

    def step() -> None:
        if mode == "forward":
            with torch.no_grad():
                model(images)
        else:
            (model(images.clone().requires_grad_()) * weights).sum().backward()

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = rss_mb()
    times = []
    for _ in range(repeats + 1):  # the first run warms up (pattern caches, allocator)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"mode": mode, "batch": batch, "seconds": statistics.median(times[1:]), "min_seconds": min(times[1:]),
            "extra_peak_mb": peak_rss_mb() - base}


def main() -> None:
    """Per-stage rows (eager, then compiled), then the memory cases."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory cases")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: "mode,batch" run in a subprocess
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        mode, batch = args.case.split(",")
        print(json.dumps(run_case(mode, int(batch), args.size, args.repeats, args.threads)))
        return

    print(f"DinoFeatUp (dino16 + FeatUp JBU), {args.size}x{args.size}, float32; {cpu_model()}")
    model = standin_featup()
    stage_breakdown(model, args.size, args.repeats, "eager")
    if not args.no_compile:
        compile_in_place(model)
        images, _ = _inputs(1, args.size)
        start = time.perf_counter()
        with torch.inference_mode():
            model(images)
        print(f"compile time (first call of the compiled view): {time.perf_counter() - start:.1f} s")
        stage_breakdown(model, args.size, args.repeats, "compiled")
    if args.no_memory:
        return
    print(f"memory cases (eager, each in a fresh process), median of {args.repeats} runs after one warm-up:")
    print(f"{'case':<18} {'batch':>5} {'time (s)':>9} {'min (s)':>8} {'extra peak (MB)':>16}")
    for mode, batch in CASES:
        command = [sys.executable, __file__, "--case", f"{mode},{batch}", "--size", str(args.size),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(f"{mode:<18} {batch:>5} {result['seconds']:>9.2f} {result['min_seconds']:>8.2f} "
              f"{result['extra_peak_mb']:>16.0f}")


if __name__ == "__main__":
    main()
