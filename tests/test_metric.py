"""MEt3R end to end: parity with ../shared/parity/met3r (tolerances of its README, section 5)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from _parity import load_json, load_tensors, parity_path, standin_state_dict
from safetensors import safe_open

from met3r_diffusers import MEt3R, MEt3ROutput
from met3r_diffusers.geometry import canonical_point_map, estimate_focal
from met3r_diffusers.models import DinoFeatUp, DUSt3R, MASt3R

FEATUP_MANIFEST = ("featup", "dino16_jbu.manifest.json")
GIVEN = ["given_a_64x64", "given_b_64x64_imgsize64", "given_c2_64x96", "given_d_64x64_imgsize128"]
FEATINJECT = ["given_c_48x80_featinject", "given_e_featinject_64x64"]
CHAINS = {"chain_mast3r_tiny_64x64": ("mast3r_tiny_catmlpdpt", MASt3R), "chain_dust3r_tiny_64x64": ("dust3r_tiny_dpt", DUSt3R)}


class InjectedGeometry(torch.nn.Module):
    """Stands in for the geometry network: returns the fixture's pred1 / pred2 whatever the input."""

    def __init__(self, ref: dict[str, torch.Tensor]):
        super().__init__()
        self.preds = (
            {"pts3d": ref["pred1.pts3d"], "conf": ref["pred1.conf"]},
            {"pts3d_in_other_view": ref["pred2.pts3d_in_other_view"], "conf": ref["pred2.conf"]},
        )

    def forward(self, view1, view2):
        assert view1["img"].shape[0] == self.preds[0]["pts3d"].shape[0]
        return self.preds


class InjectedFeatures(torch.nn.Module):
    """Stands in for the feature network: returns fixed (B*V, C, h, w) features whatever the input."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = torch.nn.Parameter(features.clone())

    def forward(self, images):
        return self.features


@pytest.fixture(scope="module")
def featup() -> DinoFeatUp:
    model = DinoFeatUp()
    model.load_state_dict(standin_state_dict(FEATUP_MANIFEST, seed=0))
    return model.eval()


def _case(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    ref = load_tensors("met3r", f"{name}.safetensors")
    with safe_open(str(parity_path("met3r", f"{name}.safetensors")), "pt") as handle:
        call = json.loads(handle.metadata()["call"])
    return ref, call


def _run(metric: MEt3R, images: torch.Tensor, requires_grad: bool = True) -> tuple[MEt3ROutput, torch.Tensor]:
    x = images.clone().requires_grad_(requires_grad)
    out = metric(x, return_overlap_mask=True, return_score_map=True, return_projections=True)
    if requires_grad:
        out.score.nansum().backward()
    return out, x.grad


def _check_maps(out: MEt3ROutput, ref: dict[str, torch.Tensor]) -> None:
    """Mask exact, score 1e-4, map 1e-2 everywhere / 1e-3 on >= 99 % of mask pixels, projections rel 1e-4."""
    assert out.overlap_mask.shape == ref["mask"].shape
    flips = (out.overlap_mask != ref["mask"]).flatten(1).sum(1)
    assert int(flips.max()) == 0, f"mask pixels differ: {flips.tolist()}"
    empty = ref["mask"].flatten(1).sum(1) == 0
    assert torch.isnan(out.score[empty]).all(), "pairs without overlap must score NaN"
    torch.testing.assert_close(out.score[~empty], ref["score"][~empty], rtol=0, atol=1e-4)
    torch.testing.assert_close(out.overlap_fraction[:, 0], ref["mask"].mean((1, 2)), rtol=0, atol=0)
    diff = (out.score_map - ref["score_map"]).abs()
    assert float(diff.detach().max()) <= 1e-2
    in_mask = diff[ref["mask"] > 0]
    if in_mask.numel():
        assert float((in_mask <= 1e-3).float().mean()) >= 0.99
    proj = out.projections.permute(0, 1, 3, 4, 2)  # ours (B, 2, C, H, W) -> reference (B, 2, H, W, C)
    scale = ref["proj.norm"].max()
    torch.testing.assert_close(proj.norm(dim=-1), ref["proj.norm"], rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close((proj[:, 0] * proj[:, 1]).sum(-1), ref["proj.dot"], rtol=0, atol=1e-4 * scale**2)
    if "proj.sub" in ref:
        torch.testing.assert_close(proj[..., ref["proj.channels"]], ref["proj.sub"], rtol=0, atol=1e-4 * scale)
    if "proj.full" in ref:
        torch.testing.assert_close(proj, ref["proj.full"], rtol=0, atol=1e-4 * scale)


def _check_grad(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours is not None and ours.shape == ref.shape
    tol = max(1e-6, 1e-3 * float(ref.abs().max()))
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("name", GIVEN)
def test_given_geometry_matches_reference(name, featup):
    ref, call = _case(name)
    metric = MEt3R(img_size=call["ctor"]["img_size"], backbone=InjectedGeometry(ref), feature_backbone=featup)
    out, grad = _run(metric, ref["images"])
    _check_maps(out, ref)
    _check_grad(grad, ref["grad.images"])
    # the focal is computed from the canonical point map exactly as the reference does
    canon = canonical_point_map(ref["pred1.pts3d"], ref["pred2.pts3d_in_other_view"], ref["pred1.conf"], ref["pred2.conf"])
    torch.testing.assert_close(estimate_focal(canon).repeat_interleave(2, 0), ref["focal.ndc"], rtol=1e-5, atol=0)


def test_seed_constructor_names_and_tuple_unpacking(featup):
    ref, call = _case("given_a_64x64")
    assert set(call["ctor"]) == {"img_size", "use_norm", "feat_backbone", "featup_weights", "dust3r_weights",
                                 "use_mast3r_dust3r"}
    metric = MEt3R(**{**call["ctor"], "feat_backbone": featup}, backbone=InjectedGeometry(ref))
    with torch.no_grad():
        score, mask, score_map, proj = metric(ref["images"], **call["forward"])
    torch.testing.assert_close(score, ref["score"], rtol=0, atol=1e-4)
    assert torch.equal(mask, ref["mask"]) and score_map.shape == ref["score_map"].shape
    assert proj.shape == (2, 2, 384, 64, 64)
    (only_score,) = metric(ref["images"])
    torch.testing.assert_close(only_score, score)


def test_head_reference_matches_head_fixture(featup):
    ref, call = _case("given_a_HEAD_64x64")
    assert call["ctor"]["upsampler"] == "featup" and call["ctor"]["distance"] == "cosine"
    metric = MEt3R(img_size=None, backbone=InjectedGeometry(ref), feature_backbone=featup, reference="head")
    out, grad = _run(metric, ref["images"])
    # the HEAD fixture stores projections as (B, 2, n, H, W); _check_maps compares channels last
    ref = {**ref, "proj.sub": ref["proj.sub"].permute(0, 1, 3, 4, 2)}
    _check_maps(out, ref)
    _check_grad(grad, ref["grad.images"])


@pytest.mark.parametrize("name", FEATINJECT)
def test_injected_features_match_reference_tightly(name):
    ref, _ = _case(name)
    injected = InjectedFeatures(ref["features.injected"])
    # the injected features answer one call for all views: no chunking
    metric = MEt3R(img_size=None, backbone=InjectedGeometry(ref), feature_backbone=injected, chunk_size=None)
    injected.features.requires_grad_(True)  # as the fixture: a leaf replacing the upsampler after construction
    out, _ = _run(metric, ref["images"], requires_grad=False)
    out.score.nansum().backward()
    _check_maps(out, ref)
    torch.testing.assert_close(out.score[out.overlap_fraction[:, 0] > 0], ref["score"][ref["score"] != 0],
                               rtol=0, atol=2e-5)
    torch.testing.assert_close(injected.features.grad, ref["grad.features"], rtol=0,
                               atol=1e-4 * float(ref["grad.features"].abs().max()))


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_full_chain_on_standin_weights(name, featup):
    config, model_class = CHAINS[name]
    ref, _ = _case(name)
    manifest = load_json("dust3r", f"{config}.manifest.json")
    with torch.device("meta"):
        backbone = model_class(**manifest["init_kwargs"])
    backbone.load_state_dict(standin_state_dict(("dust3r", f"{config}.manifest.json"), seed=0), assign=True)
    metric = MEt3R(img_size=None, backbone=backbone, feature_backbone=featup)
    points, conf = metric.compute_geometry(ref["images"], [(0, 1)])
    for ours, expected in ((points[:, 0, 0], ref["pred1.pts3d"]), (points[:, 0, 1], ref["pred2.pts3d_in_other_view"])):
        # random-weight backbones are ill-conditioned (README 5): relative to the point's distance
        assert ((ours - expected).norm(dim=-1) / (1 + expected.norm(dim=-1))).max() <= 3e-4
        assert (ours - expected).abs().max() / expected.abs().max() <= 1e-4
    torch.testing.assert_close(conf[:, 0], torch.stack([ref["pred1.conf"], ref["pred2.conf"]], 1), rtol=1e-4, atol=0)
    with torch.no_grad():
        features = metric.compute_features(ref["images"]).flatten(0, 1)  # (B*2, H*W, C)
    torch.testing.assert_close(features.norm(dim=-1), ref["features.norm"], rtol=1e-4, atol=0)
    out, grad = _run(metric, ref["images"])
    # the random backbone's geometry has no overlap: the reference scores 0, we score NaN and report it
    assert float(ref["mask"].sum()) == 0 and torch.isnan(out.score).all()
    assert torch.equal(out.overlap_fraction, torch.zeros(2, 1))
    assert torch.equal(out.overlap_mask, ref["mask"]) and torch.equal(out.score_map, ref["score_map"])
    assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(ref["grad.images"], torch.zeros_like(grad))


def test_empty_overlap_is_nan_not_zero():
    ref, _ = _case("given_e_featinject_64x64")
    metric = MEt3R(img_size=None, backbone=InjectedGeometry(ref), feature_backbone=InjectedFeatures(ref["features.injected"]),
                   chunk_size=None)
    out = metric(ref["images"])
    assert ref["score"][1] == 0 and math.isnan(out.score[1]) and out.overlap_fraction[1, 0] == 0
    assert out.score[0] == pytest.approx(float(ref["score"][0]), abs=2e-5)
