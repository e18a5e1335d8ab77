"""Deprecated: `ViewLayout` lives in `met3r_diffusers.diffusion`, pair resolution in `met3r_diffusers.pairs`."""
from __future__ import annotations

import warnings
from typing import Any

_MOVED = {
    "ViewLayout": "diffusion", "LAYOUT_KINDS": "diffusion",
    "resolve_pairs": "pairs", "PairSpec": "pairs", "PAIR_MODES": "pairs",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        warnings.warn(
            f"met3r_diffusers.views.{name} moved to met3r_diffusers.{_MOVED[name]}.{name}; the old path will be "
            "removed in 0.3", FutureWarning, stacklevel=2,
        )
        return getattr(importlib.import_module(f"met3r_diffusers.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
