"""View layouts (how diffusers pipelines arrange views) and pair selection."""
from __future__ import annotations

from typing import Sequence, Union

PairSpec = Union[str, Sequence[Sequence[int]], None]

PAIR_MODES = ("adjacent", "all", "reference")


def resolve_pairs(pairs: PairSpec, num_views: int) -> list[tuple[int, int]]:
    """Turn a pair specification into an explicit list of (i, j) view-index pairs.

    `None` means the single pair (0, 1) for two views and "adjacent" for more.
    "adjacent": (0,1), (1,2), ...; "all": every i < j; "reference": (0, j) for j >= 1.
    """
    if num_views < 2:
        raise ValueError(f"num_views must be at least 2 to form a pair, got {num_views}")
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
    result = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"pairs entries must be (i, j) tuples, got {pair!r}")
        i, j = int(pair[0]), int(pair[1])
        if not (0 <= i < num_views and 0 <= j < num_views):
            raise ValueError(f"pair {(i, j)} is out of range for {num_views} views")
        if i == j:
            raise ValueError(f"pair {(i, j)} compares a view with itself")
        result.append((i, j))
    if not result:
        raise ValueError("pairs is an empty list")
    return result
