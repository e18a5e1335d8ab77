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
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--channels", type=int, default=384)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    points, features, focal = make_workload(args.size, args.channels)
    settings = dict(image_size=args.size, radius=0.01, points_per_pixel=10, background=-10000.0)
    grad_seed = torch.randn(2, args.size, args.size, args.channels)
    rss_inputs = peak_rss_mb()

    forward_times = []
    for _ in range(args.repeats + 1):  # first run is a warm-up
        start = time.perf_counter()
        out = render_points(points, features, focal, **settings)
        forward_times.append(time.perf_counter() - start)
        del out
    rss_forward = peak_rss_mb()

    points.requires_grad_(True)
    features.requires_grad_(True)
    backward_times = []
    for _ in range(args.repeats + 1):
        points.grad = features.grad = None
        start = time.perf_counter()
        out = render_points(points, features, focal, **settings)
        (out.images * grad_seed).sum().backward()
        backward_times.append(time.perf_counter() - start)
        del out
    rss_backward = peak_rss_mb()

    hit = (render_points(points.detach(), features.detach(), focal, **settings).idx[..., 0] >= 0).float().mean()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {sys.version.split()[0]}")
    print(
        f"workload: 2 clouds x {args.size * args.size} points, {args.size}x{args.size}, K=10, r=0.01, "
        f"C={args.channels}, focal {focal[0].tolist()}, {100 * hit:.1f}% pixels hit"
    )
    print(
        f"forward:            median {statistics.median(forward_times[1:]):.3f} s "
        f"(min {min(forward_times[1:]):.3f} s, {args.repeats} runs)"
    )
    print(
        f"forward + backward: median {statistics.median(backward_times[1:]):.3f} s "
        f"(min {min(backward_times[1:]):.3f} s, {args.repeats} runs)"
    )
    print(
        f"peak RSS (ru_maxrss): inputs {rss_inputs:.0f} MB, after forward {rss_forward:.0f} MB "
        f"(+{rss_forward - rss_inputs:.0f}), after forward+backward {rss_backward:.0f} MB "
        f"(+{rss_backward - rss_inputs:.0f})"
    )


if __name__ == "__main__":
    main()
