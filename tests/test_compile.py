"""Opt-in torch.compile (`MEt3R(compile=True)`, `models.compile.compile_units`): compiled outputs keep parity."""
from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from _parity import load_json, load_tensors, standin_state_dict

from met3r_diffusers.models import DinoFeatUp, MASt3R
from met3r_diffusers.models import compile as compile_module
from met3r_diffusers.models.compile import compile_units, inductor_works
from met3r_diffusers.testing import tiny_met3r

TINY_MAST3R = "mast3r_tiny_catmlpdpt"


def _tiny_mast3r() -> MASt3R:
    manifest = load_json("dust3r", f"{TINY_MAST3R}.manifest.json")
    seed = next(e["weights_seed"] for e in load_json("dust3r", "index.json")["entries"] if e["config"] == TINY_MAST3R)
    with torch.device("meta"):
        model = MASt3R(**manifest["init_kwargs"])
    model.load_state_dict(standin_state_dict(("dust3r", f"{TINY_MAST3R}.manifest.json"), seed), assign=True)
    return model.eval().requires_grad_(False)


def _relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs() / ref.abs()).max().item()


def _check_geometry(pred1: dict, pred2: dict, ref: dict[str, torch.Tensor]) -> None:
    """The parity README's tolerances (as tests/test_dust3r.py applies them)."""
    for ours, key in ((pred1["pts3d"], "pred1.pts3d"), (pred2["pts3d_in_other_view"], "pred2.pts3d_in_other_view")):
        expected = ref[key]
        assert ((ours - expected).norm(dim=-1) / (1 + expected.norm(dim=-1))).max() <= 3e-4
        assert (ours - expected).abs().max() / expected.abs().max() <= 1e-4
    for i, pred in ((1, pred1), (2, pred2)):
        assert _relative(pred["conf"], ref[f"pred{i}.conf"]) <= 2e-4
        assert (pred["desc"] - ref[f"pred{i}.desc"]).norm(dim=-1).max() <= 3e-5
        assert _relative(pred["desc_conf"], ref[f"pred{i}.desc_conf"]) <= 5e-5


def _check_gradient(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert (ours - ref).norm() / ref.norm() <= 1e-2
    assert 1 - F.cosine_similarity(ours.flatten(), ref.flatten(), dim=0) <= 1e-5
    assert (ours - ref).abs().max() / ref.abs().max() <= 1e-2


def test_units_fallback_and_config(monkeypatch, caplog):
    model = _tiny_mast3r()
    units = [m for m in model.modules() if getattr(type(m), "compile_unit", False)]
    assert len(units) == len(model.enc_blocks) + 2 * len(model.dec_blocks)
    assert compile_units(torch.nn.Linear(2, 2)) == 0  # nothing to compile
    # where inductor cannot run (no C++ compiler, no Triton) everything stays eager, with a warning
    monkeypatch.setattr(compile_module, "inductor_works", lambda device_type: False)
    assert compile_units(model) == 0
    assert all(getattr(unit, "_compiled_call_impl", None) is None for unit in units)
    inductor_works.cache_clear()
    monkeypatch.undo()
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("no cc")))
    with caplog.at_level(logging.WARNING, logger="met3r_diffusers.models.compile"):
        assert not inductor_works("cpu")
    assert "stay eager" in caplog.text
    inductor_works.cache_clear()
    monkeypatch.undo()
    metric = tiny_met3r()
    assert metric.config.compile is False
    with pytest.raises(TypeError, match="compile"):
        type(metric)(img_size=None, backbone=metric.backbone, feature_backbone=metric.feature_backbone, compile=1)


@pytest.mark.slow
def test_compiled_geometry_keeps_parity_with_gradients():
    """Compiled encoder/decoder blocks: outputs and image gradients within the parity tolerances."""
    if not inductor_works("cpu"):
        pytest.skip("inductor does not work on this machine")
    eager = _tiny_mast3r()
    compiled = copy.deepcopy(eager)
    assert compile_units(compiled) == len(compiled.enc_blocks) + 2 * len(compiled.dec_blocks)
    inputs = load_tensors("dust3r", "inputs", "b2_64x64.safetensors")
    ref = load_tensors("dust3r", "outputs", TINY_MAST3R, "b2_64x64.safetensors")
    for model in (compiled, eager):
        img1, img2 = inputs["img1"].clone().requires_grad_(), inputs["img2"].clone().requires_grad_()
        pred1, pred2 = model({"img": img1}, {"img": img2})
        _check_geometry(pred1, pred2, ref)
        (pred1["pts3d"] * ref["grad.G1"]).sum().add((pred2["pts3d_in_other_view"] * ref["grad.G2"]).sum()).backward()
        _check_gradient(img1.grad, ref["grad.img1"])
        _check_gradient(img2.grad, ref["grad.img2"])


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MET3R_TEST_COMPILE_FEATURES") != "1",
    reason="compiling DINO + FeatUp takes ~3.5 min on 2 cores; set MET3R_TEST_COMPILE_FEATURES=1 to run it",
)
def test_compiled_features_keep_parity():
    """Compiled DINO blocks and JBU stages (dense window logits): final features within the FeatUp tolerance."""
    if not inductor_works("cpu"):
        pytest.skip("inductor does not work on this machine")
    model = DinoFeatUp()
    model.load_state_dict(standin_state_dict(("featup", "dino16_jbu.manifest.json"), seed=0))
    model.eval().requires_grad_(False)
    assert compile_units(model) == 12 + 4
    data = load_tensors("featup", "pair_bird_128x128.safetensors")
    images = ((data["img"] + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        features = model(images)
    assert (features[:, data["channels"]] - data["92a75c6/hr"]).abs().max() <= 5e-5  # STAGE_TOL of test_features
