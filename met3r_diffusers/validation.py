"""Argument checks shared by every public constructor: a ValueError that names the argument, NaN and inf refused."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = ["check_finite", "check_positive_int", "check_size"]


def check_finite(
    name: str, value: object, minimum: float | None = None, positive: bool = False, optional: bool = False
) -> float | None:
    """`value` as a finite float (>= `minimum`, > 0 when `positive`); None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_positive_int(name: str, value: object, optional: bool = False) -> int | None:
    """`value` as an int >= 1 (numpy integers accepted, floats and bools refused); None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_size(name: str, value: object, optional: bool = True) -> tuple[int, int] | None:
    """`value` as an (H, W) pair of positive integers: an int means a square; floats and bools are refused."""
    if value is None and optional:
        return None

    def is_size(number: object) -> bool:
        return isinstance(number, numbers.Integral) and not isinstance(number, bool) and number > 0

    size = (value, value) if is_size(value) else tuple(value) if isinstance(value, Sequence) and not isinstance(
        value, str) else ()
    if len(size) != 2 or not all(is_size(s) for s in size):
        raise ValueError(f"{name} must be a positive int or (H, W) of positive ints, got {value!r}")
    return int(size[0]), int(size[1])
