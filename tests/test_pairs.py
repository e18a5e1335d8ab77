"""Pair resolution: modes, explicit lists, and refusal of anything that is not an integer pair."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from met3r_diffusers.pairs import resolve_pairs


def test_modes():
    assert resolve_pairs("adjacent", 4) == [(0, 1), (1, 2), (2, 3)]
    assert resolve_pairs("reference", 3) == [(0, 1), (0, 2)]
    assert resolve_pairs("all", 3) == [(0, 1), (0, 2), (1, 2)]
    assert resolve_pairs(None, 2) == [(0, 1)]


def test_integer_like_indices_are_accepted():
    assert resolve_pairs([(np.int64(0), np.int32(2))], 3) == [(0, 2)]
    assert resolve_pairs((1, 0), 2) == [(1, 0)]
    assert resolve_pairs([(torch.tensor(0), torch.tensor(1))], 2) == [(0, 1)]


@pytest.mark.parametrize("pairs", [[(0.9, 1.7)], (0.0, 1.0), [(0, 1.0)], [(True, 1)], [("0", "1")], [(0, 1, 2)], []])
def test_non_integer_or_malformed_pairs_are_refused(pairs):
    with pytest.raises(ValueError, match="pair"):
        resolve_pairs(pairs, 3)


@pytest.mark.parametrize("num_views", [1, 2.0, True])
def test_num_views_must_be_an_integer_of_at_least_two(num_views):
    with pytest.raises(ValueError, match="num_views"):
        resolve_pairs("adjacent", num_views)
