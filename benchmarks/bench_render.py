"""Time and peak memory of `render_points` on MEt3R's default rendering workload.

Workload: 2 point clouds x 65,536 points (two 256x256 point maps of the same smooth surface,
seen from two cameras a small baseline apart, both in camera 1's frame), 384 feature channels,
a 256x256 render, K = 10 points per pixel, radius 0.01 NDC, background -10000, float32, CPU,
2 threads. The focal length comes from MEt3R's estimator (`geometry.estimate_focal`) on the
canonical point map, exactly as MEt3R sets up its camera.

Memory: peak resident set size of the process (`resource.getrusage(RUSAGE_SELF).ru_maxrss`),
read after the inputs are built and again after the forward runs and after the
forward+backward runs. The peak only ever grows, so each reading is the process peak up to that
point; the deltas are what rendering added on top of the inputs.

    python benchmarks/bench_render.py [--repeats 5] [--threads 2] [--size 256] [--channels 384]
                                      [--baseline OLD_RENDER_PY]

`--baseline` takes another copy of render.py (e.g. `git show REV:met3r_diffusers/render.py >
/tmp/render_old.py`) and times it interleaved with the current one in the same process, so the
printed ratios (current / baseline) are not skewed by other load on a shared machine; peak RSS
then covers both renderers. A quick setting: `--repeats 3 --size 128`.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import sys
import time
from typing import Callable

import torch

from met3r_diffusers.geometry import canonical_point_map, estimate_focal
from met3r_diffusers.render import render_points


def make_workload(size: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two point maps of a wavy surface (view 2 expressed in view 1's frame), features and focal."""
    generator = torch.Generator().manual_seed(seed)
    focal_px = float(size)
    pixel = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    rays = torch.stack(torch.broadcast_tensors(pixel[None, :] / focal_px, pixel[:, None] / focal_px), dim=-1)

    def depth(ray: torch.Tensor) -> torch.Tensor:
        return 2.0 + 0.3 * torch.sin(3.0 * ray[..., 0]) * torch.cos(2.0 * ray[..., 1])

    view1 = torch.cat([rays, torch.ones_like(rays[..., :1])], dim=-1) * depth(rays)[..., None]
    # View 2: camera moved 0.1 to the right, rays sampled on the same surface.
    view2 = torch.cat([rays, torch.ones_like(rays[..., :1])], dim=-1) * depth(rays + 0.05)[..., None]
    view2[..., 0] += 0.1
    points = torch.stack([view1, view2]).reshape(2, size * size, 3)
    conf = 1.0 + torch.rand(2, size, size, generator=generator)
    canon = canonical_point_map(view1[None], view2[None], conf[:1], conf[1:])
    focal = estimate_focal(canon).repeat(2, 1)
    features = torch.randn(2, size * size, channels, generator=generator)
    return points, features, focal


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_baseline(path: str) -> Callable:
    """`render_points` of another copy of render.py (it must import nothing relative)."""
    spec = importlib.util.spec_from_file_location("baseline_render", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render_points


def time_forward(render: Callable, points, features, focal, settings) -> float:
    """Seconds for one render without gradients."""
    start = time.perf_counter()
    render(points.detach(), features.detach(), focal, **settings)
    return time.perf_counter() - start


def time_backward(render: Callable, points, features, focal, grad_seed, settings) -> float:
    """Seconds for one render plus the backward pass w.r.t. points and features."""
    points, features = points.detach().requires_grad_(True), features.detach().requires_grad_(True)
    start = time.perf_counter()
    (render(points, features, focal, **settings).images * grad_seed).sum().backward()
    return time.perf_counter() - start


def summary(times: list[float]) -> str:
    """Median and min of the timed runs (the first, a warm-up, is left out)."""
    return f"median {statistics.median(times[1:]):.3f} s (min {min(times[1:]):.3f} s, {len(times) - 1} runs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--baseline", default=None, help="another render.py to time interleaved with this one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    points, features, focal = make_workload(args.size, args.channels)
    settings = dict(image_size=args.size, radius=0.01, points_per_pixel=10, background=-10000.0)
    grad_seed = torch.randn(2, args.size, args.size, args.channels)
    renders = {"current": render_points}
    if args.baseline:
        renders["baseline"] = load_baseline(args.baseline)
    rss_inputs = peak_rss_mb()

    forward = {name: [] for name in renders}
    for repeat in range(args.repeats + 1):  # first run is a warm-up
        for name in list(renders)[:: 1 if repeat % 2 else -1]:  # alternate the order
            forward[name].append(time_forward(renders[name], points, features, focal, settings))
    rss_forward = peak_rss_mb()
    backward = {name: [] for name in renders}
    for repeat in range(args.repeats + 1):
        for name in list(renders)[:: 1 if repeat % 2 else -1]:
            backward[name].append(time_backward(renders[name], points, features, focal, grad_seed, settings))
    rss_backward = peak_rss_mb()

    hit = (render_points(points, features, focal, **settings).idx[..., 0] >= 0).float().mean()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {sys.version.split()[0]}")
    print(
        f"workload: 2 clouds x {args.size * args.size} points, {args.size}x{args.size}, K=10, r=0.01, "
        f"C={args.channels}, focal {focal[0].tolist()}, {100 * hit:.1f}% pixels hit"
    )
    for name in renders:
        print(f"{name:8s} forward:            {summary(forward[name])}")
        print(f"{name:8s} forward + backward: {summary(backward[name])}")
    if args.baseline:
        for label, times in (("forward", forward), ("forward + backward", backward)):
            ratio = statistics.median(times["current"][1:]) / statistics.median(times["baseline"][1:])
            print(f"current / baseline, {label}: {ratio:.3f} (ratio of medians)")
    print(
        f"peak RSS (ru_maxrss): inputs {rss_inputs:.0f} MB, after forward {rss_forward:.0f} MB "
        f"(+{rss_forward - rss_inputs:.0f}), after forward+backward {rss_backward:.0f} MB "
        f"(+{rss_backward - rss_inputs:.0f})"
    )


if __name__ == "__main__":
    main()
