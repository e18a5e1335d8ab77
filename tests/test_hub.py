"""Checkpoint loading: save_pretrained files, official `.pth` files, hub cache, clear errors."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from _parity import load_json, standin_state_dict
from safetensors.torch import load_file, save_file

from met3r_diffusers import hub
from met3r_diffusers.models import DUSt3R, MASt3R

CONFIG = "dust3r_tiny_dpt"
# what the official training scripts store in args.model (the loader rewrites patch_embed_cls / landscape_only)
OFFICIAL_STRING = (
    "AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
    "head_type='dpt', output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), "
    "enc_embed_dim=64, enc_depth=2, enc_num_heads=2, dec_embed_dim=48, dec_depth=10, dec_num_heads=2)"
)


@pytest.fixture(scope="module")
def official_state_dict() -> dict[str, torch.Tensor]:
    return standin_state_dict(("dust3r", f"{CONFIG}.manifest.json"), 0)


@pytest.fixture(scope="module")
def reference(official_state_dict):
    """(model, input pair, outputs) of the tiny DUSt3R built directly from the manifest."""
    model = DUSt3R(**load_json("dust3r", f"{CONFIG}.manifest.json")["init_kwargs"]).eval()
    model.load_state_dict(official_state_dict, strict=True)
    gen = torch.Generator().manual_seed(0)
    views = ({"img": torch.rand(1, 3, 32, 48, generator=gen) * 2 - 1},
             {"img": torch.rand(1, 3, 32, 48, generator=gen) * 2 - 1})
    with torch.no_grad():
        outputs = model(*views)
    return model, views, outputs


def _assert_same_outputs(model, reference) -> None:
    _, views, expected = reference
    assert not model.training
    with torch.no_grad():
        outputs = model(*views)
    for ours, theirs in zip(outputs, expected):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key


def test_save_pretrained_round_trip(tmp_path, reference):
    model = reference[0]
    model.save_pretrained(tmp_path / "tiny")
    assert sorted(os.listdir(tmp_path / "tiny")) == ["config.json", "model.safetensors"]
    loaded = DUSt3R.from_pretrained(tmp_path / "tiny")
    assert loaded.config == model.config
    _assert_same_outputs(loaded, reference)
    with pytest.raises(ValueError, match="head_type: only 'catmlp\\+dpt'"):
        MASt3R.from_pretrained(tmp_path / "tiny")  # a DUSt3R config has no descriptor head


def test_naver_pth_with_namespace_args(tmp_path, official_state_dict, reference):
    path = tmp_path / "checkpoint.pth"
    torch.save({"args": argparse.Namespace(model=OFFICIAL_STRING, lr=1e-4), "model": official_state_dict,
                "epoch": 3}, path)
    loaded = DUSt3R.from_pretrained(path)
    assert loaded.config["patch_embed_cls"] == "PatchEmbedDust3R" and loaded.config["landscape_only"] is False
    _assert_same_outputs(loaded, reference)


def test_naver_pth_with_string_args_and_wrong_class(tmp_path, official_state_dict, reference):
    path = tmp_path / "checkpoint.pth"
    torch.save({"args": OFFICIAL_STRING, "model": official_state_dict}, path)
    _assert_same_outputs(DUSt3R.from_pretrained(path), reference)
    with pytest.raises(ValueError, match="holds a AsymmetricCroCo3DStereo"):
        MASt3R.from_pretrained(path)


def test_truncated_naver_pth_names_keys(tmp_path, official_state_dict):
    path = tmp_path / "checkpoint.pth"
    partial = {k: v for k, v in official_state_dict.items() if not k.startswith("downstream_head2.")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save({"args": argparse.Namespace(model=OFFICIAL_STRING), "model": partial}, path)
    with pytest.raises(ValueError, match=r"missing keys: downstream_head2\.dpt\.") as err:
        DUSt3R.from_pretrained(path)
    assert "1 unexpected keys: extra.weight" in str(err.value) and str(path) in str(err.value)
    # a file cut short (interrupted download)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read this checkpoint"):
        DUSt3R.from_pretrained(path)


class _Unlisted:
    """A class that a weights_only unpickler must refuse to rebuild."""


def test_pth_with_code_is_refused(tmp_path, official_state_dict):
    path = tmp_path / "evil.pth"
    torch.save({"args": "AsymmetricCroCo3DStereo(enc_depth=__import__('os').system('echo hi'))",
                "model": official_state_dict}, path)
    with pytest.raises(ValueError, match="unsupported expression"):
        DUSt3R.from_pretrained(path)
    torch.save({"args": _Unlisted(), "model": {}}, path)
    with pytest.raises(ValueError, match="cannot read this checkpoint safely"):
        DUSt3R.from_pretrained(path)


@pytest.mark.parametrize(
    "text",
    ["__import__('os').system('ls')", "Model(*args)", "Model(a=open('f'))", "Model(a=x.y)", "Model(a=1+2"],
)
def test_parse_constructor_call_rejects_non_literals(text):
    with pytest.raises(ValueError):
        hub.parse_constructor_call(text)


def test_parse_constructor_call_literals():
    name, kwargs = hub.parse_constructor_call(
        "AsymmetricMASt3R(depth_mode=('exp', -inf, float('inf')), two_confs=True, img_size=[512, 384], n=-3, "
        "d={'a': None})"
    )
    assert name == "AsymmetricMASt3R"
    inf = float("inf")
    assert kwargs == {
        "depth_mode": ("exp", -inf, inf), "two_confs": True, "img_size": [512, 384], "n": -3, "d": {"a": None}
    }


def test_truncated_or_wrong_checkpoint_names_keys(tmp_path, reference):
    model = reference[0]
    model.save_pretrained(tmp_path / "good")
    weights = load_file(str(tmp_path / "good" / "model.safetensors"))

    truncated = {k: v for k, v in weights.items() if not k.startswith("enc_blocks.1.")}
    truncated["not_a_parameter.weight"] = torch.zeros(1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    save_file(truncated, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"12 missing keys: enc_blocks\.1\.norm1\.weight") as err:
        DUSt3R.from_pretrained(tmp_path / "bad")
    assert "1 unexpected keys: not_a_parameter.weight" in str(err.value)

    wrong_shape = dict(weights, **{"enc_norm.weight": torch.zeros(7)})
    save_file(wrong_shape, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match="enc_norm.weight"):
        DUSt3R.from_pretrained(tmp_path / "bad")

    # a file cut short (interrupted download): the error names the file
    data = (tmp_path / "good" / "model.safetensors").read_bytes()
    (tmp_path / "bad" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read the weights"):
        DUSt3R.from_pretrained(tmp_path / "bad")

    (tmp_path / "bad" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        DUSt3R.from_pretrained(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no such file"):
        DUSt3R.from_pretrained(tmp_path / "nothing_here.pth")


def test_hub_id_from_cache(tmp_path, monkeypatch, reference):
    """A repo id resolves through huggingface_hub's cache layout (offline, no network)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--naver--tiny"
    reference[0].save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _assert_same_outputs(DUSt3R.from_pretrained("naver/tiny", cache_dir=tmp_path / "cache"), reference)
    _assert_same_outputs(DUSt3R.from_pretrained("naver/tiny", revision=commit, cache_dir=tmp_path / "cache"), reference)
    with pytest.raises(FileNotFoundError, match="revision v2"):
        DUSt3R.from_pretrained("naver/tiny", revision="v2", cache_dir=tmp_path / "cache")


def test_offline_and_not_cached_error(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache: the error names the files and how to provide them."""
    code = (
        "from met3r_diffusers.models import MASt3R\n"
        "try:\n"
        "    MASt3R.from_pretrained('naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric')\n"
        "except FileNotFoundError as err:\n"
        "    print(err)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "empty"))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "config.json, model.safetensors" in message
    assert "naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric" in message
    assert "HF_HUB_OFFLINE=1" in message and str(tmp_path / "empty") in message
    assert "hf download" in message and ".pth" in message


def test_malformed_config_names_file_and_key(tmp_path, reference):
    reference[0].save_pretrained(tmp_path / "tiny")
    config_file = tmp_path / "tiny" / "config.json"
    good = json.loads(config_file.read_text())
    cases = [
        ({**good, "enc_dpth": 2}, r"unknown key 'enc_dpth'"),
        ({**good, "enc_depth": "2"}, r"key 'enc_depth' has the wrong type"),
        ({**good, "landscape_only": "false"}, r"key 'landscape_only' has the wrong type"),
        ({**good, "conf_mode": ["sigmoid", 0, 1]}, r"conf_mode: only the 'exp' mode"),
        ([good], r"expected a JSON object"),
    ]
    for config, message in cases:
        config_file.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message) as err:
            DUSt3R.from_pretrained(tmp_path / "tiny")
        assert str(config_file) in str(err.value)
    config_file.write_text('{"enc_depth": 2,')
    with pytest.raises(ValueError, match=r"config\.json: not a valid JSON config"):
        DUSt3R.from_pretrained(tmp_path / "tiny")


def test_other_network_folder_says_which_class_loads_it(tmp_path, reference):
    reference[0].save_pretrained(tmp_path / "dust3r")
    with pytest.raises(ValueError, match=r"holds a AsymmetricCroCo3DStereo .* load it with DUSt3R\.from_pretrained"):
        MASt3R.from_pretrained(tmp_path / "dust3r")
    (tmp_path / "mast3r").mkdir()
    config = dict(json.loads((tmp_path / "dust3r" / "config.json").read_text()), head_type="catmlp+dpt",
                  output_mode="pts3d+desc24", two_confs=True, desc_mode="norm", desc_conf_mode=["exp", 0, "inf"])
    (tmp_path / "mast3r" / "config.json").write_text(json.dumps(config))
    save_file({"mask_token": torch.zeros(1, 64)}, str(tmp_path / "mast3r" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"holds a AsymmetricMASt3R .* load it with MASt3R\.from_pretrained"):
        DUSt3R.from_pretrained(tmp_path / "mast3r")


def test_local_looking_missing_paths_are_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub must not be asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(hub, "check_connection", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    for name in ["weights/mast3r", "./mast3r", "../mast3r", str(tmp_path / "missing" / "mast3r"), "~/no_such_met3r_dir",
                 "a/b/c", "mast3r", "naver/model.pth", "C:\\weights\\mast3r"]:
        with pytest.raises(FileNotFoundError, match="no such file or directory") as err:
            MASt3R.from_pretrained(name)
        assert "not a Hugging Face repo id" in str(err.value), name
    assert hub.looks_like_local_path("weights/mast3r") and not hub.looks_like_local_path("naver/mast3r")
