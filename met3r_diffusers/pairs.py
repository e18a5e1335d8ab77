"""Which view pairs are scored: "adjacent" | "all" | "reference" | an explicit list of (i, j)."""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Union

PairSpec = Union[str, Sequence[Sequence[int]], None]

PAIR_MODES = ("adjacent", "all", "reference")

__all__ = ["PAIR_MODES", "PairSpec", "resolve_pairs"]


def _view_index(value: object, pair: object) -> int:
    """`value` as a view index: Python and numpy integers (and integral 0-d tensors) only, never a truncated float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if hasattr(value, "ndim") and getattr(value, "ndim") == 0 and not value.dtype.is_floating_point:  # torch int
            return int(value)
        raise ValueError(f"pairs: view indices must be integers, got {pair!r}")
    return int(value)


def resolve_pairs(pairs: PairSpec, num_views: int) -> list[tuple[int, int]]:
    """Turn a pair specification into an explicit list of (i, j) view-index pairs.

    `None` means the single pair (0, 1) for two views and "adjacent" for more.
    "adjacent": (0,1), (1,2), ...; "all": every i < j; "reference": (0, j) for j >= 1; a single
    (i, j) or a list of them is taken as given (integer indices only; numpy integers are accepted).
    """
    if isinstance(num_views, bool) or not isinstance(num_views, numbers.Integral) or num_views < 2:
        raise ValueError(f"num_views must be an integer of at least 2 to form a pair, got {num_views!r}")
    num_views = int(num_views)
    if pairs is None:
        pairs = "adjacent"
    if isinstance(pairs, str):
        if pairs == "adjacent":
            return [(i, i + 1) for i in range(num_views - 1)]
        if pairs == "all":
            return [(i, j) for i in range(num_views) for j in range(i + 1, num_views)]
        if pairs == "reference":
            return [(0, j) for j in range(1, num_views)]
        raise ValueError(f"pairs must be one of {PAIR_MODES} or a list of (i, j), got {pairs!r}")
    if not isinstance(pairs, Sequence) and not hasattr(pairs, "__len__"):
        raise ValueError(f"pairs must be one of {PAIR_MODES} or a list of (i, j), got {pairs!r}")
    if len(pairs) == 2 and all(isinstance(v, numbers.Number) for v in pairs):  # a single (i, j)
        pairs = [pairs]
    result = []
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise ValueError(f"pairs entries must be (i, j) tuples, got {pair!r}")
        i, j = _view_index(pair[0], pair), _view_index(pair[1], pair)
        if not (0 <= i < num_views and 0 <= j < num_views):
            raise ValueError(f"pair {(i, j)} is out of range for {num_views} views")
        if i == j:
            raise ValueError(f"pair {(i, j)} compares a view with itself")
        result.append((i, j))
    if not result:
        raise ValueError("pairs is an empty list")
    return result
