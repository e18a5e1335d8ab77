"""Time and peak memory of the DINO ViT-S/16 + FeatUp JBU feature stage (`DinoFeatUp`).

Workload: MEt3R's feature stage on 256x256 images (ImageNet-normalised random images, guidance =
the normalised image), stand-in weights (deterministic, same shapes as the official checkpoint;
the parity fixtures' `weights.py`, random ones if the fixtures are absent), float32, CPU,
parameters frozen. Cases: forward (no autograd) and forward+backward (gradient of
`sum(features * G)` w.r.t. the input image) for a batch of 1 and of 2.

Memory: peak resident set size of the process (`resource.getrusage(RUSAGE_SELF).ru_maxrss`).
Each case runs in a fresh subprocess, so its peak is its own; "extra" is that peak minus the
resident size after the model and the inputs are built (before the first measured run).

Anchors (original FeatUp + MEt3R on this machine kind, with FeatUp's CPU op vectorised): 4.1 s
forward (batch 1), 7.7 s forward (batch 2), 11.5 s forward+backward (batch 1); extra peak memory
1.7 GB (batch 2 forward) and 3.1 GB (batch 2 forward+backward).

    python benchmarks/bench_features.py [--repeats 3] [--threads 2] [--size 256]
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
from pathlib import Path

import torch

from met3r_diffusers.models import DinoFeatUp
from met3r_diffusers.models.featup import IMAGENET_MEAN, IMAGENET_STD

REPO_ROOT = Path(__file__).resolve().parents[1]
CASES = [("forward", 1), ("forward", 2), ("forward+backward", 1), ("forward+backward", 2)]


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_model() -> DinoFeatUp:
    """DinoFeatUp with the parity stand-in weights (seed 0), frozen, eval mode."""
    model = DinoFeatUp()
    manifest = REPO_ROOT.parent / "shared" / "parity" / "featup" / "dino16_jbu.manifest.json"
    weights = REPO_ROOT.parent / "shared" / "parity" / "weights.py"
    if manifest.is_file() and weights.is_file():
        sys.path.insert(0, str(weights.parent))
        from weights import load_manifest, make_state_dict

        model.load_state_dict(make_state_dict(load_manifest(manifest), seed=0))
    return model.eval().requires_grad_(False)


def run_case(mode: str, batch: int, size: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images01 = torch.rand(batch, 3, size, size)
    weights = torch.randn(batch, model.dim, size, size)

    def step() -> None:
        if mode == "forward":
            with torch.no_grad():
                model((images01 - mean) / std)
        else:
            images = images01.clone().requires_grad_()
            (model((images - mean) / std) * weights).sum().backward()

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: "mode,batch" run in a subprocess
    args = parser.parse_args()
    if args.case:
        mode, batch = args.case.split(",")
        print(json.dumps(run_case(mode, int(batch), args.size, args.repeats, args.threads)))
        return

    print(f"DinoFeatUp (dino16 + FeatUp JBU), {args.size}x{args.size}, float32, CPU, {args.threads} threads, "
          f"median of {args.repeats} runs after one warm-up; torch {torch.__version__}")
    print(f"{'case':<18} {'batch':>5} {'time (s)':>9} {'min (s)':>8} {'extra peak (MB)':>16}")
    for mode, batch in CASES:
        command = [sys.executable, __file__, "--case", f"{mode},{batch}", "--size", str(args.size),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(f"{mode:<18} {batch:>5} {result['seconds']:>9.2f} {result['min_seconds']:>8.2f} "
              f"{result['extra_peak_mb']:>16.0f}")


if __name__ == "__main__":
    main()
