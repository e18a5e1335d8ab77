"""MEt3R multi-view consistency metric, loss and diffusers / Accelerate integration."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> submodule that defines it. Imported lazily so that `import met3r_diffusers`
# stays cheap and optional integrations (diffusers, accelerate) are only imported when used.
_EXPORTS = {
    "MEt3R": "metric",
    "MEt3RConfig": "metric",
    "MEt3ROutput": "metric",
    "MEt3RMetric": "evaluation",
    "MEt3REvaluator": "evaluation",  # deprecated alias of MEt3RMetric
    "MEt3REvalHook": "evaluation",
    "MEt3RLoss": "loss",
    "predict_x0": "diffusion",
    "decode_views": "diffusion",
    "ViewLayout": "diffusion",
    "MEt3RCallback": "callbacks",
    "render_points": "render",
    "RenderOutput": "render",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .callbacks import MEt3RCallback
    from .diffusion import ViewLayout, decode_views, predict_x0
    from .evaluation import MEt3REvalHook, MEt3REvaluator, MEt3RMetric
    from .loss import MEt3RLoss
    from .metric import MEt3R, MEt3RConfig, MEt3ROutput
    from .render import RenderOutput, render_points


from . import logging  # noqa: E402  (verbosity helpers; applies MET3R_DIFFUSERS_VERBOSITY)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
