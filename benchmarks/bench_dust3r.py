"""Speed, FLOPs and memory of the full-size MASt3R (ViT-L encoder, ViT-B decoders, catmlp+dpt head) on CPU.

Uses deterministic stand-in weights (no download), so it needs the parity fixtures
(../shared/parity or MET3R_PARITY_DIR). Usage:

    python benchmarks/bench_dust3r.py [--threads 2] [--repeats 3] [--model mast3r|dust3r] [--full] [--no-compile]

A pair runs as the metric runs it: `encode_views` on both images ("encoder"), then `decode_pair`
("decoder+heads"). Each setting prints, per stage and for the whole pair: the median time over
the repeats (after one warm-up), its FLOPs, the float32 and bf16 floors (FLOPs / the matmul rate
probed in this process around the measurement, see benchmarks/common.py) and the ratio to each,
and the peak resident memory of the pair (VmHWM reset before each setting; weights and runtime
included). Settings: 256x256 forward in float32 and under bf16 autocast, forward+backward w.r.t.
the images; `--full` adds 384x512, `descriptors=False` and weights stored in bf16. Then the same
settings again with the encoder/decoder blocks compiled (`models.compile.compile_units`), with
the compile time (first call minus a steady call) of each.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    MANIFESTS,
    compile_in_place,
    count_gflop,
    cpu_model,
    reset_peak,
    rss_gib,
    stage_line,
    standin_model,
    timed,
)


@dataclass(frozen=True)
class Setting:
    """One measured configuration of a pair forward."""

    label: str
    height: int = 256
    width: int = 256
    backward: bool = False
    bf16: bool = False
    descriptors: bool = True
    bf16_weights: bool = False


def _pair_fns(model: torch.nn.Module, setting: Setting) -> dict[str, Callable[[], None]]:
    """Zero-argument callables of the stages and of the whole pair for one setting."""
    gen = torch.Generator().manual_seed(0)
    height, width = setting.height, setting.width
    images = torch.rand(2, 3, height, width, generator=gen) * 2 - 1
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting.bf16)
    with torch.inference_mode(), autocast:
        encoded = model.encode_views(images)

    def encoder() -> None:
        with torch.inference_mode(), autocast:
            model.encode_views(images)

    def decoder() -> None:
        tokens, pos = encoded
        with torch.inference_mode(), autocast:
            model.decode_pair(tokens[:1], pos[:1], tokens[1:], pos[1:], (height, width), (height, width),
                              descriptors=setting.descriptors)

    def pair() -> None:
        views = images.clone().requires_grad_(setting.backward)
        with torch.inference_mode(not setting.backward), torch.set_grad_enabled(setting.backward), autocast:
            tokens, pos = model.encode_views(views)
            pred1, pred2 = model.decode_pair(tokens[:1], pos[:1], tokens[1:], pos[1:], (height, width),
                                             (height, width), descriptors=setting.descriptors)
            if setting.backward:
                (pred1["pts3d"].mean() + pred2["pts3d_in_other_view"].mean()).backward()

    return {"encoder (2 views)": encoder, "decoder+heads (1 pair)": decoder, "pair": pair}


def _run(model: torch.nn.Module, settings: list[Setting], repeats: int, tag: str, first_call: bool) -> None:
    for setting in settings:
        if setting.bf16_weights and next(model.parameters()).dtype != torch.bfloat16:
            model.to(torch.bfloat16)
        fns = _pair_fns(model, setting)
        print(f"{tag} {setting.label}:")
        if first_call:  # compile happens on the first call of each shape / dtype
            start = time.perf_counter()
            fns["pair"]()
            first = time.perf_counter() - start
        for name, fn in fns.items():
            if name != "pair" and setting.backward:
                continue  # the stages are forward-only; the backward row is the whole pair
            reset_peak()
            timing = timed(fn, repeats)
            gflop = count_gflop(fn, inference=not setting.backward)
            print("    " + stage_line(name, timing, gflop) + (f" | peak RSS {rss_gib('VmHWM'):.2f} GiB"
                                                             if name == "pair" else ""))
        if first_call:
            print(f"    compile time (first pair call - steady pair call): {first - timing.seconds:.1f} s")


def main() -> None:
    """Run the benchmark: every setting eager, then every setting compiled."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=sorted(MANIFESTS), default="mast3r")
    parser.add_argument("--full", action="store_true", help="also 384x512, descriptors=False and bf16 weights")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    model = standin_model(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model} full size: {n_params / 1e6:.1f} M parameters ({n_params * 4 / 2**30:.2f} GiB float32), "
          f"built in {time.perf_counter() - start:.1f} s; {cpu_model()}; RSS after loading {rss_gib('VmRSS'):.2f} GiB")
    settings = [Setting("forward 256x256"), Setting("forward 256x256 bf16 autocast", bf16=True),
                Setting("forward+backward 256x256", backward=True)]
    if args.full:
        settings[1:1] = [Setting("forward 384x512", 384, 512)]
        if args.model == "mast3r":
            settings.insert(1, Setting("forward 256x256 descriptors=False", descriptors=False))
        # last: the weights themselves in bf16 (half their memory, no cast at every call), under autocast
        settings += [Setting("bf16 weights: forward 256x256", bf16=True, bf16_weights=True),
                     Setting("bf16 weights: forward 384x512", 384, 512, bf16=True, bf16_weights=True)]
    _run(model, settings, args.repeats, "eager", first_call=False)
    if not args.no_compile:
        model.float()
        compile_in_place(model)
        _run(model, settings, args.repeats, "compiled", first_call=True)


if __name__ == "__main__":
    main()
