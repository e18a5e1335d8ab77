"""Weight-compatible networks: DUSt3R / MASt3R geometry and DINO + FeatUp features."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DUSt3R": "dust3r",
    "MASt3R": "mast3r",
    "DinoFeatUp": "featup",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
