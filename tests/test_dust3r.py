"""DUSt3R / MASt3R: parity with the official networks (../shared/parity/dust3r), API behaviour."""
from __future__ import annotations

import copy
import gc

import pytest
import torch
from _parity import load_json, load_tensors, standin_state_dict

from met3r_diffusers.models import DUSt3R, MASt3R

CLASSES = {"AsymmetricCroCo3DStereo": DUSt3R, "AsymmetricMASt3R": MASt3R}
TINY = ["dust3r_tiny_dpt", "mast3r_tiny_catmlpdpt"]
TINY_CASES = ["b2_64x64", "b1_80x48_portrait", "b1_mixed_64x64_48x80"]
FULL_CASES = ["b2_128x128", "b1_96x160"]


def _seed(config: str) -> int:
    seeds = {e["weights_seed"] for e in load_json("dust3r", "index.json")["entries"] if e["config"] == config}
    assert len(seeds) == 1
    return seeds.pop()


def _build(config: str, state_dict: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Model of `config` with the stand-in weights, loaded strictly under the official names."""
    manifest = load_json("dust3r", f"{config}.manifest.json")
    if state_dict is None:
        state_dict = standin_state_dict(("dust3r", f"{config}.manifest.json"), _seed(config))
    with torch.device("meta"):  # no second copy of the weights
        model = CLASSES[manifest["class"]](**manifest["init_kwargs"])
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    return {config: _build(config) for config in TINY}


# --- tolerance checks of the parity README -------------------------------------------------

def _check_points(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert ((ours - ref).norm(dim=-1) / (1 + ref.norm(dim=-1))).max() <= 3e-4
    assert (ours - ref).abs().max() / ref.abs().max() <= 1e-4


def _check_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert ours.shape == ref.shape
    assert ((ours - ref).abs() / ref.abs()).max() <= tol


def _check_preds(pred1: dict, pred2: dict, ref: dict[str, torch.Tensor]) -> None:
    _check_points(pred1["pts3d"], ref["pred1.pts3d"])
    _check_points(pred2["pts3d_in_other_view"], ref["pred2.pts3d_in_other_view"])
    for i, pred in ((1, pred1), (2, pred2)):
        _check_rel(pred["conf"], ref[f"pred{i}.conf"], 2e-4)
        if f"pred{i}.desc" in ref:
            assert pred["desc"].shape == ref[f"pred{i}.desc"].shape
            assert (pred["desc"] - ref[f"pred{i}.desc"]).norm(dim=-1).max() <= 3e-5
            _check_rel(pred["desc_conf"], ref[f"pred{i}.desc_conf"], 5e-5)
        else:
            assert "desc" not in pred
    assert "pts3d" not in pred2 and "pts3d_in_other_view" not in pred1


def _check_grad(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert (ours - ref).norm() / ref.norm() <= 1e-2
    assert 1 - torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0) <= 1e-5
    assert (ours - ref).abs().max() / ref.abs().max() <= 1e-2


# --- tiny configs: outputs, intermediates, image gradients --------------------------------

@pytest.mark.parametrize("case", TINY_CASES)
@pytest.mark.parametrize("config", TINY)
def test_tiny_parity(tiny_models, config, case):
    model = tiny_models[config]
    inputs = load_tensors("dust3r", "inputs", f"{case}.safetensors")
    ref = load_tensors("dust3r", "outputs", config, f"{case}.safetensors")
    img1 = inputs["img1"].clone().requires_grad_(True)
    img2 = inputs["img2"].clone().requires_grad_(True)

    pred1, pred2 = model({"img": img1, "instance": [""]}, {"img": img2, "instance": [""]})
    _check_preds(pred1, pred2, ref)
    loss = (pred1["pts3d"] * ref["grad.G1"]).sum() + (pred2["pts3d_in_other_view"] * ref["grad.G2"]).sum()
    assert abs(loss.item() - ref["grad.loss"].item()) <= 2e-4 * abs(ref["grad.loss"].item())
    loss.backward()
    _check_grad(img1.grad, ref["grad.img1"])
    _check_grad(img2.grad, ref["grad.img2"])

    # intermediates: encoder tokens, positions, the token lists the heads receive
    with torch.no_grad():
        tokens1, pos1 = model.encode_views(inputs["img1"])
        tokens2, pos2 = model.encode_views(inputs["img2"])
        dec1, dec2 = model._decode(tokens1, pos1, tokens2, pos2)
    assert torch.equal(pos1, ref["enc.pos1"]) and torch.equal(pos2, ref["enc.pos2"])
    assert (tokens1 - ref["enc.feat1"]).abs().max() <= 1e-4
    assert (tokens2 - ref["enc.feat2"]).abs().max() <= 1e-4
    assert len(dec1) == len(dec2) == 11
    for i in range(11):
        assert (dec1[i] - ref[f"dec1.list.{i:02d}"]).abs().max() <= 1e-4
        assert (dec2[i] - ref[f"dec2.list.{i:02d}"]).abs().max() <= 1e-4


def test_true_shape_and_shared_encoding_match_forward(tiny_models):
    model = tiny_models["mast3r_tiny_catmlpdpt"]
    inputs = load_tensors("dust3r", "inputs", "b2_64x64.safetensors")
    ref = load_tensors("dust3r", "outputs", "mast3r_tiny_catmlpdpt", "b2_64x64.safetensors")
    with torch.no_grad():
        shape = torch.tensor([[64, 64], [64, 64]])
        explicit = model({"img": inputs["img1"], "true_shape": shape}, {"img": inputs["img2"], "true_shape": shape})
        _check_preds(*explicit, ref)
        # per-view sharing: encode each view once, decode the pair from the shared tokens
        tokens, pos = model.encode_views(torch.cat((inputs["img1"], inputs["img2"])))
        shared = model.decode_pair(tokens[:2], pos[:2], tokens[2:], pos[2:], shape, (64, 64))
        lean = model.decode_pair(tokens[:2], pos[:2], tokens[2:], pos[2:], shape, (64, 64), descriptors=False)
    for ours, theirs, without_desc in zip(shared, explicit, lean):
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-4 * theirs[key].abs().max().item())
        # descriptors=False skips the descriptor head and leaves points and confidences untouched
        assert without_desc.keys() == ours.keys() - {"desc", "desc_conf"}
        for key in without_desc:
            torch.testing.assert_close(without_desc[key], ours[key], rtol=1e-5, atol=0.0)


def test_batch_of_non_square_pairs_matches_single_pairs(tiny_models):
    model = tiny_models["dust3r_tiny_dpt"]
    gen = torch.Generator().manual_seed(0)
    img1, img2 = (torch.rand(2, 3, 48, 112, generator=gen) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        batched = model({"img": img1}, {"img": img2})
        assert batched[0]["pts3d"].shape == (2, 48, 112, 3) and batched[1]["conf"].shape == (2, 48, 112)
        for b in range(2):
            single = model({"img": img1[b : b + 1]}, {"img": img2[b : b + 1]})
            _check_points(single[0]["pts3d"][0], batched[0]["pts3d"][b])
            _check_points(single[1]["pts3d_in_other_view"][0], batched[1]["pts3d_in_other_view"][b])


def test_bf16_cpu_autocast_covers_the_heads_and_outputs_float32(tiny_models):
    """As the official forward, whose head guard only disables CUDA autocast."""
    model = tiny_models["mast3r_tiny_catmlpdpt"]
    inputs = load_tensors("dust3r", "inputs", "b2_64x64.safetensors")
    ref = load_tensors("dust3r", "outputs", "mast3r_tiny_catmlpdpt", "b2_64x64.safetensors")
    head_dtypes = []
    hook = model.downstream_head1.dpt.head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            tokens, _ = model.encode_views(inputs["img1"])
            pred1, pred2 = model({"img": inputs["img1"]}, {"img": inputs["img2"]})
    finally:
        hook.remove()
    assert tokens.dtype == torch.bfloat16 and head_dtypes == [torch.bfloat16]
    for pred in (pred1, pred2):
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in pred.values())
    # bf16 keeps ~3 significant digits: tokens and confidences stay close to the float32 reference
    assert (tokens.float() - ref["enc.feat1"]).abs().max() / ref["enc.feat1"].abs().max() < 0.05
    assert ((pred1["conf"] - ref["pred1.conf"]).abs() / ref["pred1.conf"]).median() < 0.05


def test_bf16_weights_run_under_autocast_and_output_float32(tiny_models):
    model = copy.deepcopy(tiny_models["mast3r_tiny_catmlpdpt"]).to(torch.bfloat16)
    inputs = load_tensors("dust3r", "inputs", "b2_64x64.safetensors")
    ref = load_tensors("dust3r", "outputs", "mast3r_tiny_catmlpdpt", "b2_64x64.safetensors")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred1, pred2 = model({"img": inputs["img1"]}, {"img": inputs["img2"]})
    for pred in (pred1, pred2):
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in pred.values())
    assert ((pred1["conf"] - ref["pred1.conf"]).abs() / ref["pred1.conf"]).median() < 0.05
    assert ((pred2["conf"] - ref["pred2.conf"]).abs() / ref["pred2.conf"]).median() < 0.05


def test_constructor_accepts_json_and_python_forms():
    manifest = load_json("dust3r", "mast3r_tiny_catmlpdpt.manifest.json")["init_kwargs"]
    python_form = dict(manifest, depth_mode=("exp", -float("inf"), float("inf")), conf_mode=("exp", 1, float("inf")),
                       desc_conf_mode=("exp", 0, float("inf")), img_size=(512, 512))
    with torch.device("meta"):
        a, b = MASt3R(**manifest), MASt3R(**python_form)
    assert a.config == b.config
    assert a.conf_mode == ("exp", 1.0, float("inf")) and a.desc_conf_mode == ("exp", 0.0, float("inf"))
    assert a.config["depth_mode"] == ["exp", -float("inf"), float("inf")]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"head_type": "linear"}, "head_type"),
        ({"output_mode": "pts3d+desc24"}, "output_mode"),
        ({"conf_mode": ("sigmoid", 0, 1)}, "conf_mode"),
        ({"pos_embed": "cosine"}, "pos_embed"),
        ({"patch_size": 8}, "patch_size"),
        ({"dec_depth": 2}, "dec_depth"),
    ],
)
def test_constructor_rejects_unsupported_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match), torch.device("meta"):
        DUSt3R(**kwargs)


def test_bad_inputs_raise(tiny_models):
    model = tiny_models["dust3r_tiny_dpt"]
    img = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        model({"img": torch.zeros(1, 3, 64, 56)}, {"img": torch.zeros(1, 3, 64, 56)})
    with pytest.raises(ValueError, match="true_shape"):
        model({"img": img, "true_shape": torch.tensor([[48, 64]])}, {"img": img})
    with pytest.raises(ValueError, match="batch sizes"):
        model({"img": img}, {"img": torch.zeros(2, 3, 64, 64)})
    tokens, pos = model.encode_views(img)
    with pytest.raises(ValueError, match="shape2"):
        model.decode_pair(tokens, pos, tokens, pos, (64, 64), (48, 64))
    with pytest.raises(ValueError, match="share one"):
        model.decode_pair(tokens, pos, tokens, pos, torch.tensor([[64, 64], [48, 64]]), (64, 64))


def test_dpt_aliases_and_missing_second_decoder():
    """Either alias of the DPT projections loads (`layer_rn.i` wins); a missing dec_blocks2 copies dec_blocks."""
    config = "dust3r_tiny_dpt"
    official = standin_state_dict(("dust3r", f"{config}.manifest.json"), _seed(config))
    model = _build(config, dict(official))
    for h in (1, 2):
        for i in range(4):
            assert torch.equal(model.get_submodule(f"downstream_head{h}.dpt.scratch.layer_rn.{i}").weight,
                               official[f"downstream_head{h}.dpt.scratch.layer_rn.{i}.weight"])
    # a safetensors export may keep only the `layerN_rn` names
    only_alias = {k: v for k, v in official.items() if ".scratch.layer_rn." not in k}
    for h in (1, 2):
        for i in range(4):
            only_alias[f"downstream_head{h}.dpt.scratch.layer{i + 1}_rn.weight"] = official[
                f"downstream_head{h}.dpt.scratch.layer_rn.{i}.weight"]
    aliased = _build(config, only_alias)
    assert all(torch.equal(p, q) for p, q in zip(aliased.parameters(), model.parameters()))
    # no dec_blocks2 at all: filled from dec_blocks, as the official loader does
    no_dec2 = {k: v for k, v in official.items() if not k.startswith("dec_blocks2.")}
    single = _build(config, no_dec2)
    assert torch.equal(single.dec_blocks2[3].cross_attn.projq.weight, official["dec_blocks.3.cross_attn.projq.weight"])
    # the original dict is not modified by loading
    assert "mask_token" in official and "downstream_head1.dpt.scratch.layer1_rn.weight" in official


# --- full-size configs (ViT-L encoder, ViT-B decoders) ---------------------------------------

@pytest.fixture(scope="module")
def full_mast3r():
    model = _build("mast3r_vitl_512_catmlpdpt_metric")
    yield model
    del model
    gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES)
def test_full_mast3r_parity(full_mast3r, case):
    inputs = load_tensors("dust3r", "inputs", f"{case}.safetensors")
    ref = load_tensors("dust3r", "outputs", "mast3r_vitl_512_catmlpdpt_metric", f"{case}.safetensors")
    with torch.no_grad():
        pred1, pred2 = full_mast3r({"img": inputs["img1"]}, {"img": inputs["img2"]})
    _check_preds(pred1, pred2, ref)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES)
def test_full_dust3r_parity(full_mast3r, case):
    """DUSt3R ViT-L: its stand-in tensors are exactly MASt3R's tensors of the same names (seeded by
    name), so the model is built on MASt3R's weights without generating 2.3 GB again."""
    dust3r_manifest = load_json("dust3r", "dust3r_vitl_512_dpt.manifest.json")["tensors"]
    mast3r_manifest = load_json("dust3r", "mast3r_vitl_512_catmlpdpt_metric.manifest.json")["tensors"]
    assert _seed("dust3r_vitl_512_dpt") == _seed("mast3r_vitl_512_catmlpdpt_metric")
    assert all(mast3r_manifest[k] == v for k, v in dust3r_manifest.items())
    shared = full_mast3r.state_dict()
    state_dict = {k: shared[k] for k in dust3r_manifest if k in shared}
    model = _build("dust3r_vitl_512_dpt", state_dict)
    inputs = load_tensors("dust3r", "inputs", f"{case}.safetensors")
    ref = load_tensors("dust3r", "outputs", "dust3r_vitl_512_dpt", f"{case}.safetensors")
    with torch.no_grad():
        tokens1, pos1 = model.encode_views(inputs["img1"])
        tokens2, pos2 = model.encode_views(inputs["img2"])
        dec1, dec2 = model._decode(tokens1, pos1, tokens2, pos2)
        shape1, shape2 = inputs["img1"].shape[-2:], inputs["img2"].shape[-2:]
        pred1, pred2 = model.decode_pair(tokens1, pos1, tokens2, pos2, shape1, shape2)
    assert (tokens1 - ref["enc.feat1"]).abs().max() <= 1e-4 and (tokens2 - ref["enc.feat2"]).abs().max() <= 1e-4
    assert (dec1[-1] - ref["dec1.final"]).abs().max() <= 1e-4 and (dec2[-1] - ref["dec2.final"]).abs().max() <= 1e-4
    _check_preds(pred1, pred2, ref)
