"""Logging for met3r_diffusers, in the style of diffusers' `utils.logging`.

Every module logs through `logging.getLogger(__name__)` under the library's root logger "met3r_diffusers"; these
helpers set that logger's level (default: WARNING, or `MET3R_DIFFUSERS_VERBOSITY=debug|info|warning|error`)::

    from met3r_diffusers import logging
    logging.set_verbosity_info()
"""
from __future__ import annotations

import logging
import os

__all__ = [
    "get_logger", "get_verbosity", "set_verbosity", "set_verbosity_debug", "set_verbosity_error",
    "set_verbosity_info", "set_verbosity_warning",
]

LIBRARY_NAME = "met3r_diffusers"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _library_logger() -> logging.Logger:
    logger = logging.getLogger(LIBRARY_NAME)
    if logger.level == logging.NOTSET:
        name = os.environ.get("MET3R_DIFFUSERS_VERBOSITY", "warning").lower()
        logger.setLevel(_LEVELS.get(name, logging.WARNING))
    return logger


_library_logger()  # MET3R_DIFFUSERS_VERBOSITY applies from the first import of the package


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger `name` (a module's `__name__`), or the library's root logger."""
    _library_logger()
    return logging.getLogger(name or LIBRARY_NAME)


def get_verbosity() -> int:
    """The library logger's level (`logging.WARNING` by default)."""
    return _library_logger().getEffectiveLevel()


def set_verbosity(level: int) -> None:
    """Set the library logger's level (`logging.INFO`, ...)."""
    if isinstance(level, bool) or not isinstance(level, int):
        raise ValueError(f"level must be a logging level int (e.g. logging.INFO), got {level!r}")
    _library_logger().setLevel(level)


def set_verbosity_debug() -> None:
    """Log everything (DEBUG)."""
    set_verbosity(logging.DEBUG)


def set_verbosity_info() -> None:
    """Log progress information (INFO)."""
    set_verbosity(logging.INFO)


def set_verbosity_warning() -> None:
    """Log warnings and errors only (the default)."""
    set_verbosity(logging.WARNING)


def set_verbosity_error() -> None:
    """Log errors only."""
    set_verbosity(logging.ERROR)
