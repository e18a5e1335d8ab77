"""Overhead of `met3r-diffusers score` itself (decoding, resizing, batching, journal and report) against the metric.

Part 1 scores `--scenes` generated scenes of `--views` PNG views (stored 288x256, resized to `--size`) with a
zero-cost stand-in metric (`zero_metric`, through `--metric-factory`), so what is timed is the CLI alone: one
process and two (`accelerate launch`, gloo on CPU), each without and with DataLoader workers. Part 2 scores
`--real-scenes` scenes with the real `MEt3R` class on full-size MASt3R + DINO/FeatUp stand-in weights (the parity
fixtures, as bench_metric.py; no download) and reports the fraction of the scoring loop spent inside the metric
and the metric's time per view, to which the CLI's overhead per view is compared. Usage:

    python benchmarks/bench_score.py [--scenes 1000] [--views 2] [--size 256] [--threads 2] [--real-scenes 2]

Times come from the report's `provenance.timing` (`loop_s`: the scoring loop of the slowest process, `metric_s`:
inside the metric, summed over processes) and from the wall clock of the whole command (start-up, model, report).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent


def zero_metric():
    """A metric with MEt3R's call signature and output fields that computes nothing (score 0, full overlap)."""
    from met3r_diffusers.metric import MEt3ROutput
    from met3r_diffusers.pairs import resolve_pairs

    def metric(views: torch.Tensor, pairs="adjacent", return_score_map=False, return_overlap_mask=False):
        pair_list = resolve_pairs(pairs, views.shape[1])
        batch, num_pairs, size = views.shape[0], len(pair_list), views.shape[-2:]
        maps = torch.zeros(batch, num_pairs, *size) if return_score_map or return_overlap_mask else None
        return MEt3ROutput(score=torch.zeros(batch), pair_scores=torch.zeros(batch, num_pairs),
                           overlap_fraction=torch.ones(batch, num_pairs), pairs=pair_list, score_map=maps,
                           overlap_mask=maps, valid=torch.ones(batch, num_pairs, dtype=torch.bool))

    return metric


def standin_metric():
    """The real MEt3R on the full-size MASt3R + DINO/FeatUp stand-in weights of the parity fixtures."""
    sys.path.insert(0, str(HERE))
    from common import standin_featup, standin_model

    from met3r_diffusers import MEt3R

    return MEt3R(img_size=None, backbone=standin_model("mast3r"), feature_backbone=standin_featup())


def write_scenes(root: Path, num_scenes: int, num_views: int) -> None:
    """Smooth random 288x256 PNG views (a low-resolution noise field, bilinearly enlarged), one folder per scene."""
    rng = np.random.default_rng(0)
    for k in range(num_scenes):
        folder = root / f"scene_{k:05d}"
        folder.mkdir(parents=True)
        for v in range(num_views):
            small = Image.fromarray(rng.integers(0, 255, (16, 18, 3), dtype=np.uint8))
            small.resize((288, 256), Image.BILINEAR).save(folder / f"view_{v}.png", compress_level=1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(root: Path, out: Path, factory: str, processes: int, workers: int, size: int, threads: int) -> dict:
    """Score `root` in a subprocess; returns the report's timing, the wall time and the number of views."""
    command = ["-m", "met3r_diffusers.cli", "score", str(root), "--size", str(size), "--quiet", "--out", str(out),
               "--num-workers", str(workers), "--metric-factory", factory]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(max(1, threads // processes))}
    if processes > 1:
        env.update(ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo")
        command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *command]
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    report = json.loads(out.read_text())
    return {**report["provenance"]["timing"], "wall_s": wall, "num_scenes": report["num_scenes"]}


def main() -> None:
    """Run both parts and print one line per setting."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real-scenes", type=int, default=2, help="scenes scored with the real metric (0 skips)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from common import cpu_model

    print(f"CPU: {cpu_model()}")
    with tempfile.TemporaryDirectory(prefix="bench-score-") as folder:
        root = Path(folder) / "scenes"
        start = time.perf_counter()
        write_scenes(root, args.scenes, args.views)
        print(f"{args.scenes} scenes x {args.views} views (288x256 PNG -> {args.size}) written in "
              f"{time.perf_counter() - start:.1f} s; torch {torch.__version__}, {args.threads} threads")
        overhead = {}
        for processes, workers in ((1, 0), (1, 2), (2, 0), (2, 1)):
            timing = run_cli(root, Path(folder) / f"zero_{processes}_{workers}.json", "bench_score:zero_metric",
                             processes, workers, args.size, args.threads)
            per_view = timing["loop_s"] / timing["num_views"] * 1e3
            overhead[(processes, workers)] = per_view
            print(f"zero-cost metric, {processes} process(es), {workers} worker(s) each: scoring loop "
                  f"{per_view:.2f} ms/view ({timing['loop_s']:.1f} s for {timing['num_views']} views), whole command "
                  f"{timing['wall_s'] / timing['num_views'] * 1e3:.2f} ms/view ({timing['wall_s']:.1f} s)")
        if args.real_scenes:
            real = Path(folder) / "real"
            real.mkdir()
            for k in range(args.real_scenes):
                (root / f"scene_{k:05d}").rename(real / f"scene_{k:05d}")
            timing = run_cli(real, Path(folder) / "real.json", "bench_score:standin_metric", 1, 0, args.size,
                             args.threads)
            metric_per_view = timing["metric_s"] / timing["num_views"] * 1e3
            cli_per_view = (timing["loop_s"] - timing["metric_s"]) / timing["num_views"] * 1e3
            print(f"real MEt3R (stand-in weights), 1 process: {timing['metric_s'] / timing['loop_s']:.2%} of the "
                  f"scoring loop inside the metric; metric {metric_per_view:.0f} ms/view, rest of the loop "
                  f"{cli_per_view:.1f} ms/view")
            best = overhead[(1, 0)]
            print(f"CLI overhead per view (zero-cost metric, 1 process, no workers) / metric time per view: "
                  f"{best / metric_per_view:.3%}")


if __name__ == "__main__":
    main()
