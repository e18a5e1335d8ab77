"""Speed and memory of the full-size MASt3R (ViT-L encoder, ViT-B decoders, catmlp+dpt head) on CPU.

Uses deterministic stand-in weights (no download), so it needs the parity fixtures
(../shared/parity or MET3R_PARITY_DIR). Usage:

    python benchmarks/bench_dust3r.py [--threads 2] [--repeats 3] [--model mast3r|dust3r]

Reports per-pair time (median over repeats after one warm-up) of the forward at 256x256 and
512x384 (H x W = 384 x 512), with and without MASt3R's descriptor head, under bf16 autocast
(float32 weights, then weights stored in bf16), and of forward+backward w.r.t. the input images
at 256x256, with the peak resident memory of
each (VmHWM, reset before each setting; includes the weights and the PyTorch runtime). The
pair runs as the metric runs it: `encode_views` on both images, then `decode_pair`.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

from met3r_diffusers.models import DUSt3R, MASt3R

PARITY_DIR = Path(os.environ.get("MET3R_PARITY_DIR", Path(__file__).resolve().parents[2] / "shared" / "parity"))
MANIFESTS = {"mast3r": "mast3r_vitl_512_catmlpdpt_metric", "dust3r": "dust3r_vitl_512_dpt"}


def standin_model(name: str) -> torch.nn.Module:
    """Full-size model with the parity stand-in weights, built without a second copy of the weights."""
    spec = importlib.util.spec_from_file_location("_parity_weights", PARITY_DIR / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    manifest = json.loads((PARITY_DIR / "dust3r" / f"{MANIFESTS[name]}.manifest.json").read_text())
    with torch.device("meta"):
        model = (MASt3R if name == "mast3r" else DUSt3R)(**manifest["init_kwargs"])
    model.load_state_dict(weights.make_state_dict(manifest["tensors"], seed=0), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def rss_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the peak below starts clean
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def _measure(
    model: torch.nn.Module, height: int, width: int, repeats: int, backward: bool, bf16: bool, descriptors: bool
) -> dict:
    gen = torch.Generator().manual_seed(0)
    img1 = torch.rand(1, 3, height, width, generator=gen) * 2 - 1
    img2 = torch.rand(1, 3, height, width, generator=gen) * 2 - 1
    times = []
    reset_peak()
    for _ in range(repeats + 1):  # the first run is a warm-up
        a, b = img1.clone().requires_grad_(backward), img2.clone().requires_grad_(backward)
        start = time.perf_counter()
        with torch.set_grad_enabled(backward), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens, pos = model.encode_views(torch.cat((a, b)))
            pred1, pred2 = model.decode_pair(tokens[:1], pos[:1], tokens[1:], pos[1:], (height, width),
                                             (height, width), descriptors=descriptors)
            if backward:
                (pred1["pts3d"].mean() + pred2["pts3d_in_other_view"].mean()).backward()
        times.append(time.perf_counter() - start)
        del pred1, pred2
    return {"median_s": statistics.median(times[1:]), "min_s": min(times[1:]), "peak_rss_gib": rss_gib("VmHWM")}


def matmul_rate() -> float:
    """GFLOP/s of a float32 (512 x 1024) @ (1024 x 4096) product on this machine right now."""
    a, b = torch.randn(512, 1024), torch.randn(1024, 4096)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(20):
        torch.mm(a, b)
    return 20 * 2 * 512 * 1024 * 4096 / (time.perf_counter() - start) / 1e9


def _calibration(model: torch.nn.Module) -> str:
    """FLOPs of one 256x256 pair forward and the machine's float32 matmul rate right now.

    The machine is shared, so times move with the load; FLOPs / time against the matmul rate
    shows how close the forward runs to what the machine gives at that moment.
    """
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.zeros(2, 3, 256, 256)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tokens, pos = model.encode_views(images)
        model.decode_pair(tokens[:1], pos[:1], tokens[1:], pos[1:], (256, 256), (256, 256))
    rate = matmul_rate()
    flops = counter.get_total_flops() / 1e9
    return (f"256x256 pair forward: {flops:.0f} GFLOP; float32 matmul rate now: {rate:.0f} GFLOP/s "
            f"(so >= {flops / rate:.2f} s at that rate)")


def main() -> None:
    """Run the benchmark and print one line per setting."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=sorted(MANIFESTS), default="mast3r")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model = standin_model(args.model)
    reset_peak()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model} full size: {n_params / 1e6:.1f} M parameters ({n_params * 4 / 2**30:.2f} GiB float32), "
          f"built in {time.perf_counter() - start:.1f} s; torch {torch.__version__}, {args.threads} threads; "
          f"RSS after loading {rss_gib('VmRSS'):.2f} GiB")
    print(_calibration(model))
    settings = [  # label, H, W, backward, bf16 autocast, descriptors
        ("forward 256x256", 256, 256, False, False, True),
        ("forward 384x512", 384, 512, False, False, True),
        ("forward 256x256 bf16 autocast", 256, 256, False, True, True),
        ("forward 384x512 bf16 autocast", 384, 512, False, True, True),
        ("forward+backward 256x256", 256, 256, True, False, True),
    ]
    if args.model == "mast3r":
        settings.insert(1, ("forward 256x256 descriptors=False", 256, 256, False, False, False))
    # last: the weights themselves in bf16 (half their memory, no cast at every call), under autocast
    settings += [("bf16 weights: forward 256x256", 256, 256, False, True, True, True),
                 ("bf16 weights: forward 384x512", 384, 512, False, True, True, True)]
    for label, height, width, backward, bf16, descriptors, *bf16_weights in settings:
        if bf16_weights and next(model.parameters()).dtype != torch.bfloat16:
            model.to(torch.bfloat16)
        result = _measure(model, height, width, args.repeats, backward, bf16, descriptors)
        print(f"{label:34s} {result['median_s']:6.2f} s/pair (min {result['min_s']:.2f})   "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
