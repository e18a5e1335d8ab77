"""MEt3R's canonical point map and focal estimate against the parity fixtures (parity/raster)."""

import pytest
import torch
from _parity import load_json, load_tensors

from met3r_diffusers.functional import _focal_votes, canonical_point_map, estimate_focal

FOCAL_CASES = ["focal_scene_48x64", "focal_scene_64x64", "focal_scene_dense_32x32", "focal_edge_6x8"]


@pytest.mark.parametrize("case", FOCAL_CASES)
def test_matches_met3r_fixture(case):
    ref = load_tensors("raster", f"{case}.safetensors")
    ptmps, conf = ref["ptmps"], ref["conf"]
    canon = canonical_point_map(ptmps[:, 0], ptmps[:, 1], conf[:, 0], conf[:, 1])
    torch.testing.assert_close(canon, ref["canon"], rtol=1e-6, atol=0)

    votes = _focal_votes(ref["canon"])
    torch.testing.assert_close(votes, ref["f_votes"], rtol=1e-6, atol=0, equal_nan=True)
    focal = estimate_focal(ref["canon"])
    torch.testing.assert_close(focal, ref["focal"], rtol=1e-6, atol=0)
    torch.testing.assert_close(focal.repeat_interleave(2, dim=0), ref["focal_per_cloud"], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.nanmedian(votes, dim=1).values, ref["focal_px"], rtol=1e-6, atol=0)


def test_focal_fixture_is_the_one_used_by_the_render_case():
    for case in ("scene_48x64", "scene_64x64", "scene_dense_32x32"):
        ref = load_tensors("raster", f"focal_{case}.safetensors")
        render_inputs = load_tensors("raster", f"{case}.inputs.safetensors")
        assert torch.equal(render_inputs["focal"], ref["focal_per_cloud"])
        assert torch.equal(estimate_focal(ref["canon"]).repeat_interleave(2, 0), render_inputs["focal"])


def test_edge_case_keeps_infinite_votes_and_takes_the_lower_middle_value():
    ref = load_tensors("raster", "focal_edge_6x8.safetensors")
    votes = _focal_votes(ref["canon"])
    assert torch.isnan(votes).any() and torch.isinf(votes).any()
    meta = load_json("raster", "index.json")["focal_cases"]["focal_edge_6x8"]
    assert int(torch.isnan(votes).sum()) == meta["n_nan_votes"]
    assert int(torch.isinf(votes).sum()) == meta["n_inf_votes"]
    for b in range(votes.shape[0]):
        for axis in range(2):
            valid = votes[b, :, axis][~torch.isnan(votes[b, :, axis])].sort().values
            assert valid.numel() % 2 == 0
            lower_middle = valid[valid.numel() // 2 - 1]
            assert estimate_focal(ref["canon"])[b, axis] == 1 + lower_middle / (8 if axis == 0 else 6)


def test_pinhole_point_map_gives_one_plus_focal_over_size():
    # Points on the rays of integer pixel positions (u, v) = (j - W/2, i - H/2) with focal f.
    height, width, f = 6, 10, 7.0
    v, u = torch.meshgrid(torch.arange(height) - height / 2, torch.arange(width) - width / 2, indexing="ij")
    z = 1.0 + torch.rand(height, width, generator=torch.Generator().manual_seed(0))
    points = torch.stack([u * z / f, v * z / f, z], dim=-1)[None]
    torch.testing.assert_close(estimate_focal(points), torch.tensor([[1 + f / width, 1 + f / height]]))


def test_canonical_map_weights_are_confidence_minus_0_999():
    p1, p2 = torch.zeros(1, 1, 1, 3), torch.ones(1, 1, 1, 3)
    conf1, conf2 = torch.full((1, 1, 1), 1.999), torch.full((1, 1, 1), 3.999)  # weights 1 and 3
    torch.testing.assert_close(canonical_point_map(p1, p2, conf1, conf2), torch.full((1, 1, 1, 3), 0.75))


@pytest.mark.parametrize(
    "args, name",
    [
        ((torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.ones(2, 4), torch.ones(2, 4)), "pts3d"),
        ((torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 5, 3), torch.ones(1, 2, 4), torch.ones(1, 2, 4)), "pts3d_other"),
        ((torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4, 3), torch.ones(1, 2), torch.ones(1, 2, 4)), "conf"),
        ((torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4, 3), torch.ones(1, 2, 4), torch.ones(2, 2, 4)), "conf_other"),
    ],
)
def test_canonical_map_bad_shapes(args, name):
    with pytest.raises(ValueError, match=name):
        canonical_point_map(*args)


@pytest.mark.parametrize(
    "points", [torch.zeros(4, 4, 3), torch.zeros(1, 4, 4, 2), torch.zeros(1, 4, 4, 3, dtype=torch.long)]
)
def test_estimate_focal_bad_input(points):
    with pytest.raises(ValueError, match="points"):
        estimate_focal(points)
