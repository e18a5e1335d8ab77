"""Helpers shared by the benchmarks: stand-in networks, memory probes, matmul-rate floors, FLOP counts, and for the
training experiments (exp_*.py) their command line, the training scripts as modules and a VAE fit.

The development machines are shared, so a time alone says little. Every benchmark therefore
measures the machine's matrix-product rate (float32 and bf16) in the same process right before
and right after each measurement, and prints the stage's FLOPs, the floor FLOPs / rate (the time
no implementation of the same arithmetic can beat at that moment) and the ratio time / floor.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from met3r_diffusers.models import DinoFeatUp, DUSt3R, MASt3R
from met3r_diffusers.models.compile import compile_units

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("MET3R_PARITY_DIR", Path(__file__).resolve().parents[2] / "shared" / "parity"))
MANIFESTS = {"mast3r": "mast3r_vitl_512_catmlpdpt_metric", "dust3r": "dust3r_vitl_512_dpt"}
PROBE_DTYPES = (torch.float32, torch.bfloat16)


def parity_weights_module() -> Any:
    """The fixtures' `weights.py` (deterministic stand-in weights of any manifest)."""
    spec = importlib.util.spec_from_file_location("parity_weights", PARITY_DIR / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def standin_model(name: str) -> torch.nn.Module:
    """Full-size DUSt3R / MASt3R with the parity stand-in weights, built without a second copy of the weights."""
    manifest = json.loads((PARITY_DIR / "dust3r" / f"{MANIFESTS[name]}.manifest.json").read_text())
    with torch.device("meta"):
        model = (MASt3R if name == "mast3r" else DUSt3R)(**manifest["init_kwargs"])
    state_dict = parity_weights_module().make_state_dict(manifest["tensors"], seed=0)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def standin_featup() -> DinoFeatUp:
    """DinoFeatUp with the parity stand-in weights (seed 0), frozen, eval mode."""
    manifest = json.loads((PARITY_DIR / "featup" / "dino16_jbu.manifest.json").read_text())
    model = DinoFeatUp()
    model.load_state_dict(parity_weights_module().make_state_dict(manifest["tensors"], seed=0))
    return model.eval().requires_grad_(False)


def rss_gib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    """Collect garbage, return freed heap to the OS and reset VmHWM to the current RSS (Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def cpu_model() -> str:
    """The CPU's model name, its matrix units (AMX / AVX-512 bf16) and the thread count."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = "AMX bf16" if "amx_bf16" in flags else "AVX-512 bf16, no AMX" if "avx512_bf16" in flags else "no bf16 units"
    return f"{name} ({units}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def matmul_rate(dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """GFLOP/s of a (512 x 1024) @ (1024 x 4096) product in `dtype` on this machine right now."""
    a, b = torch.randn(512, 1024, dtype=dtype), torch.randn(1024, 4096, dtype=dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return repeats * 2 * 512 * 1024 * 4096 / (time.perf_counter() - start) / 1e9


def probe_rates() -> dict[torch.dtype, float]:
    """The float32 and bf16 matmul rates (GFLOP/s) now."""
    return {dtype: matmul_rate(dtype) for dtype in PROBE_DTYPES}


def count_gflop(fn: Callable[[], Any], inference: bool = True) -> float:
    """GFLOP of the matrix products and convolutions `fn` runs (torch's FLOP counter; with
    `inference=False` a backward inside `fn` is counted too)."""
    with torch.inference_mode(inference), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


@dataclass
class Timing:
    """Median seconds over the repeats and the matmul rates probed around them (mean of before / after)."""

    seconds: float
    min_seconds: float
    rates: dict[torch.dtype, float]


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Run `fn` `warmup` times, then `repeats` times, each measurement between two rate probes.

    The rates of all probes are averaged, so the floor below belongs to the same minutes as the time.
    """
    for _ in range(warmup):
        fn()
    times, probes = [], [probe_rates()]
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        probes.append(probe_rates())
    rates = {dtype: statistics.mean(probe[dtype] for probe in probes) for dtype in PROBE_DTYPES}
    return Timing(statistics.median(times), min(times), rates)


def floor_columns(timing: Timing, gflop: float) -> str:
    """'GFLOP | f32 floor (ratio) | bf16 floor (ratio)' of a measured stage."""
    parts = [f"{gflop:7.1f} GFLOP"]
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        floor = gflop / timing.rates[dtype]
        parts.append(f"{name} floor {floor:6.3f} s @ {timing.rates[dtype]:5.0f} GFLOP/s = {timing.seconds / floor:5.2f}x")
    return " | ".join(parts)


def stage_line(label: str, timing: Timing, gflop: float) -> str:
    """One printed benchmark row: label, median (min) time, FLOPs, both floors and ratios."""
    return f"{label:44s} {timing.seconds:7.3f} s (min {timing.min_seconds:6.3f}) | {floor_columns(timing, gflop)}"


def compile_in_place(module: torch.nn.Module) -> int:
    """`compile_units` with a printed note when nothing was compiled (inductor unavailable)."""
    count = compile_units(module)
    if count == 0:
        print("    torch.compile unavailable here: the 'compiled' rows run eager (see the warning above)")
    return count


# ----------------------------------------------------------------------------- training experiments


def load_training_script(name: str) -> ModuleType:
    """Import one of the training scripts (training/<name>.py) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiment_parser(description: str, vae_steps: int) -> argparse.ArgumentParser:
    """The options every training experiment has: work folder, toy data size, VAE and base-model steps."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work_dir", type=str, default=None, help="default: a temporary folder (deleted)")
    parser.add_argument("--num_scenes", type=int, default=16)
    parser.add_argument("--num_views", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--vae_steps", type=int, default=vae_steps)
    parser.add_argument("--base_steps", type=int, default=600)
    return parser


def fit_vae(vae: torch.nn.Module, images: torch.Tensor, steps: int, seed: int) -> float:
    """Fit the tiny VAE to images (N, 3, H, W) (MSE + a small KL term); sets its scaling_factor to 1 / latent std;
    returns the reconstruction MSE."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    vae.train()
    for _ in tqdm(range(steps), desc="VAE"):
        batch = images[torch.randint(len(images), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample(generator)).sample, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        vae.register_to_config(scaling_factor=float(1 / posterior.mean.std()))
        return F.mse_loss(vae.decode(posterior.mean).sample, images).item()
