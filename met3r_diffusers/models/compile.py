"""Opt-in `torch.compile` of the networks' repeated units (`MEt3R(compile=True)`).

The units are the classes that set `compile_unit = True`: the CroCo encoder and decoder blocks
(DUSt3R / MASt3R), DINO's transformer blocks and FeatUp's JBU stages. Each is compiled in place
with `nn.Module.compile`, so the state dict, the parameters and the module tree stay as they are;
blocks of one class share their compiled code (one compilation per class, shape and dtype).
Inductor generates C++/OpenMP kernels on CPU (it needs a C++ compiler) and Triton kernels on CUDA.
When it cannot run here the networks stay eager and a warning says why.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["compile_units", "inductor_works"]


@functools.lru_cache(maxsize=4)
def inductor_works(device_type: str) -> bool:
    """Whether `torch.compile` (inductor) compiles and runs a small function on this device type."""
    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x * 2 + 1).sum(-1)

    try:
        x = torch.arange(32, dtype=torch.float32, device=device_type).reshape(4, 8)
        compiled = torch.compile(probe, dynamic=False)(x)
        if not torch.allclose(compiled, probe(x), rtol=1e-5, atol=1e-5):
            raise RuntimeError("compiled probe disagrees with eager")
    except Exception as err:  # a missing compiler, Triton, or a broken toolchain: all mean "stay eager"
        logger.warning("torch.compile does not work on %s here (%s: %s); the networks stay eager",
                       device_type, type(err).__name__, err)
        return False
    return True


def compile_units(module: nn.Module, **options: Any) -> int:
    """Compile every compile unit inside `module` in place; returns how many were compiled.

    `options` go to `torch.compile` (e.g. `mode="max-autotune"`, `dynamic=True`). Returns 0, leaving
    everything eager, when `module` holds no unit or inductor does not work on its device.
    """
    units = [sub for sub in module.modules() if getattr(type(sub), "compile_unit", False)]
    if not units:
        return 0
    parameter = next(units[0].parameters(), None)
    device_type = parameter.device.type if parameter is not None else "cpu"
    if not inductor_works(device_type):
        return 0
    for unit in units:
        unit.compile(**options)
    logger.info("compiled %d units (%s) with torch.compile; each compiles on its first call",
                len(units), ", ".join(sorted({type(unit).__name__ for unit in units})))
    return len(units)
