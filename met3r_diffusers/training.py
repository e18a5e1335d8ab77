"""Deprecated: `MEt3REvalHook` lives in `met3r_diffusers.evaluation`."""
from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "MEt3REvalHook":
        from .evaluation import MEt3REvalHook

        warnings.warn(
            "met3r_diffusers.training.MEt3REvalHook moved to met3r_diffusers.evaluation.MEt3REvalHook",
            FutureWarning, stacklevel=2,
        )
        return MEt3REvalHook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
