"""The published checkpoint layouts (../shared/checkpoints/README.md), built tiny and loaded as a user loads them.

Each test writes the tiny parity configurations' stand-in weights in exactly a published container (key set,
config syntax, metadata, training-only entries), puts the file where a user's cache would hold it (an offline
Hugging Face snapshot, the torch hub checkpoint folder) and loads it through the public entry point, without
network; the loaded model must reproduce the parity fixture.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import types
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _parity import PARITY_DIR, load_json, load_tensors, standin_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_model

from met3r_diffusers import hub
from met3r_diffusers.models import DinoFeatUp, DUSt3R, MASt3R
from met3r_diffusers.models.dino import DinoVisionTransformer
from met3r_diffusers.models.featup import (
    DINO_CHECKPOINT_URL,
    FEATUP_CACHE_FILE_NAMES,
    FEATUP_CHECKPOINT_URL,
    FEATUP_NO_NORM_CHECKPOINT_URL,
)

PUBLISHED = PARITY_DIR.parent / "checkpoints"
# network -> (class, published repo, published config.json copy, tiny parity config)
NETWORKS = {
    "mast3r": (MASt3R, hub.DEFAULT_REPO_IDS["mast3r"],
               "naver_MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.config.json", "mast3r_tiny_catmlpdpt"),
    "dust3r": (DUSt3R, hub.DEFAULT_REPO_IDS["dust3r"],
               "naver_DUSt3R_ViTLarge_BaseDecoder_512_dpt.config.json", "dust3r_tiny_dpt"),
}
SIZE_KEYS = ("enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim", "dec_depth", "dec_num_heads")
# what naver's training scripts store in args.model (tiny sizes); the loader maps ManyAR_PatchEmbed to inference
MODEL_STRINGS = {
    "mast3r": "AsymmetricMASt3R(enc_depth=2, dec_depth=10, enc_embed_dim=64, dec_embed_dim=48, enc_num_heads=2, "
              "dec_num_heads=2, pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
              "head_type='catmlp+dpt', output_mode='pts3d+desc24', depth_mode=('exp', -inf, inf), "
              "conf_mode=('exp', 1, inf), two_confs=True, desc_conf_mode=('exp', 0, inf))",
    "dust3r": "AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
              "img_size=(512, 512), head_type='dpt', output_mode='pts3d', depth_mode=('exp', -inf, inf), "
              "conf_mode=('exp', 1, inf), enc_embed_dim=64, enc_depth=2, enc_num_heads=2, dec_embed_dim=48, "
              "dec_depth=10, dec_num_heads=2)",
}
COMMIT = "5ad1bd0c6bb5ab1e5a8a2bb0d4a4c1a2f0e6b7c8"
# DINO's dino_deitsmall16_pretrain.pth: 150 names, no prefix (frozen here, independent of our model)
DINO_TOP_LEVEL = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                  "norm.bias")
DINO_BLOCK = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
DINO_KEYS = DINO_TOP_LEVEL + tuple(f"blocks.{i}.{name}" for i in range(12) for name in DINO_BLOCK)


def mixin_json(config: dict) -> str:
    """config.json as huggingface_hub's PyTorchModelHubMixin writes it."""
    return json.dumps(config, sort_keys=True, indent=2)


def tiny_config(network: str) -> dict:
    """The published config.json (key set and values) with the tiny parity config's sizes."""
    _, _, published, config = NETWORKS[network]
    tiny = load_json("dust3r", f"{config}.manifest.json")["init_kwargs"]
    return {**json.loads((PUBLISHED / published).read_text()), **{k: tiny[k] for k in SIZE_KEYS}}


def official_state_dict(network: str) -> dict[str, torch.Tensor]:
    """The official model's state_dict() after loading the stand-ins: each aliased DPT conv is one tensor
    under both names, holding the `layer_rn.{i}` value (what the official model uses)."""
    config = NETWORKS[network][3]
    state_dict = standin_state_dict(("dust3r", f"{config}.manifest.json"), 0)
    for key in [k for k in state_dict if ".scratch.layer_rn." in k]:
        index = int(key.split(".scratch.layer_rn.")[1].split(".")[0])
        state_dict[key.replace(f".scratch.layer_rn.{index}.", f".scratch.layer{index + 1}_rn.")] = state_dict[key]
    return state_dict


def as_module(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose state dict is `state_dict`, one shared Parameter per tensor object (as the aliases)."""
    root, parameters = torch.nn.Module(), {}
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            children = dict(module.named_children())
            if part not in children:
                module.add_module(part, torch.nn.Module())
            module = dict(module.named_children())[part]
        module.register_parameter(leaf, parameters.setdefault(id(value), torch.nn.Parameter(value, False)))
    return root


def place_in_hf_cache(cache, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> None:
    """Files of `repo_id` at `commit` in huggingface_hub's cache layout: blobs, snapshot symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        # LFS files are stored under their sha256, plain git files under their git blob id
        blob = repo / "blobs" / (hashlib.sha256(data).hexdigest() if name.endswith(".safetensors")
                                 else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def check_parity(model: torch.nn.Module, network: str, case: str = "b2_64x64") -> None:
    """Outputs against ../shared/parity/dust3r within its README's tolerances (as tests/test_dust3r.py)."""
    config = NETWORKS[network][3]
    inputs = load_tensors("dust3r", "inputs", f"{case}.safetensors")
    ref = load_tensors("dust3r", "outputs", config, f"{case}.safetensors")
    with torch.no_grad():
        pred1, pred2 = model({"img": inputs["img1"]}, {"img": inputs["img2"]})
    for ours, key in ((pred1["pts3d"], "pred1.pts3d"), (pred2["pts3d_in_other_view"], "pred2.pts3d_in_other_view")):
        assert ((ours - ref[key]).norm(dim=-1) / (1 + ref[key].norm(dim=-1))).max() <= 3e-4
        assert (ours - ref[key]).abs().max() / ref[key].abs().max() <= 1e-4
    for i, pred in ((1, pred1), (2, pred2)):
        assert ((pred["conf"] - ref[f"pred{i}.conf"]).abs() / ref[f"pred{i}.conf"]).max() <= 2e-4
        assert ("desc" in pred) == (f"pred{i}.desc" in ref)
        if f"pred{i}.desc" in ref:
            assert (pred["desc"] - ref[f"pred{i}.desc"]).norm(dim=-1).max() <= 3e-5
            assert ((pred["desc_conf"] - ref[f"pred{i}.desc_conf"]).abs() / ref[f"pred{i}.desc_conf"]).max() <= 5e-5


# --------------------------------------------------------------------------------------------
# MASt3R / DUSt3R on the Hugging Face Hub


@pytest.mark.parametrize("network", NETWORKS)
def test_config_writer_reproduces_the_published_files_byte_for_byte(network):
    text = (PUBLISHED / NETWORKS[network][2]).read_text()
    config = json.loads(text)
    assert mixin_json(config) == text
    assert "-Infinity" in text and "patch_size" not in config and ("freeze" in config) == (network == "dust3r")
    assert set(tiny_config(network)) == set(config)


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """config.json + model.safetensors of each tiny network, as PyTorchModelHubMixin writes them."""
    files = {}
    for network in NETWORKS:
        path = tmp_path_factory.mktemp(network) / "model.safetensors"
        save_model(as_module(official_state_dict(network)), str(path))  # drops aliases, records them in metadata
        files[network] = {"config.json": mixin_json(tiny_config(network)).encode(), "model.safetensors": path.read_bytes()}
    return files


@pytest.mark.parametrize("network", NETWORKS)
def test_hub_safetensors_layout(tmp_path, hub_files, network):
    path = tmp_path / "model.safetensors"
    path.write_bytes(hub_files[network]["model.safetensors"])
    manifest = load_json("dust3r", f"{NETWORKS[network][3]}.manifest.json")["tensors"]
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert len(keys) == len(manifest) - 8  # 1017 -> 1009 (MASt3R), 1009 -> 1001 (DUSt3R) at full size
    assert "mask_token" in keys and "downstream_head2.dpt.scratch.refinenet4.resConfUnit1.conv1.weight" in keys
    for head in (1, 2):
        for i in range(4):
            kept = f"downstream_head{head}.dpt.scratch.layer{i + 1}_rn.weight"
            assert kept in keys and metadata[f"downstream_head{head}.dpt.scratch.layer_rn.{i}.weight"] == kept


@pytest.mark.parametrize("network", NETWORKS)
def test_hub_repo_loads_by_repo_id_offline(tmp_path, monkeypatch, hub_files, network):
    from huggingface_hub import constants

    cls, repo_id, _, _ = NETWORKS[network]
    place_in_hf_cache(tmp_path / "hub", repo_id, hub_files[network])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = cls.from_pretrained(repo_id)
    check_parity(model, network)
    check_parity(cls.from_pretrained(repo_id, revision=COMMIT), network, "b1_80x48_portrait")
    other = MASt3R if cls is DUSt3R else DUSt3R
    with pytest.raises(ValueError, match=f"load it with {cls.__name__}.from_pretrained"):
        other.from_pretrained(repo_id)


@pytest.mark.slow
def test_default_repo_loads_in_a_fresh_process_with_hf_hub_offline(tmp_path, hub_files):
    """The environment a user sets (HF_HUB_OFFLINE=1, HF_HUB_CACHE) before anything is imported."""
    place_in_hf_cache(tmp_path / "hub", hub.DEFAULT_REPO_IDS["mast3r"], hub_files["mast3r"])
    code = (
        "import sys, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "from met3r_diffusers import hub\n"
        "from met3r_diffusers.models import MASt3R\n"
        "model = MASt3R.from_pretrained(hub.DEFAULT_REPO_IDS['mast3r'])\n"
        "inputs = load_file(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    pred1, pred2 = model({'img': inputs['img1']}, {'img': inputs['img2']})\n"
        "save_file({'pts3d': pred1['pts3d'], 'conf': pred2['conf']}, sys.argv[2])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    inputs = PARITY_DIR / "dust3r" / "inputs" / "b2_64x64.safetensors"
    result = subprocess.run([sys.executable, "-c", code, str(inputs), str(tmp_path / "out.safetensors")], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    out = load_file(str(tmp_path / "out.safetensors"))
    ref = load_tensors("dust3r", "outputs", "mast3r_tiny_catmlpdpt", "b2_64x64.safetensors")
    assert ((out["pts3d"] - ref["pred1.pts3d"]).norm(dim=-1) / (1 + ref["pred1.pts3d"].norm(dim=-1))).max() <= 3e-4
    assert ((out["conf"] - ref["pred2.conf"]).abs() / ref["pred2.conf"]).max() <= 2e-4


# --------------------------------------------------------------------------------------------
# naver's .pth release files


@pytest.mark.parametrize("network", NETWORKS)
def test_naver_pth_loads_without_torch_load(tmp_path, monkeypatch, network):
    """{"args": Namespace(model=...), "model": state_dict} with both alias names, read by the allow-list
    unpickler: no torch.load and no safe_globals involved, so every torch version reads it alike."""
    state_dict = official_state_dict(network)
    assert sum(".scratch.layer1_rn." in k or ".scratch.layer_rn.0." in k for k in state_dict) == 4
    path = tmp_path / f"{NETWORKS[network][1].split('/')[1]}.pth"
    args = argparse.Namespace(model=MODEL_STRINGS[network], train_dataset="10_000 @ Habitat(...)", lr=1e-4,
                              epochs=100, batch_size=4, output_dir="checkpoints/", seed=0)
    torch.save({"args": args, "model": state_dict}, path)

    def refused(*args, **kwargs):
        raise AssertionError("torch.load must not be needed")

    monkeypatch.setattr(torch, "load", refused)
    monkeypatch.delattr(torch.serialization, "safe_globals")
    monkeypatch.delattr(torch.serialization, "add_safe_globals")
    cls = NETWORKS[network][0]
    model = cls.from_pretrained(path)
    assert model.config["patch_embed_cls"] == "PatchEmbedDust3R" and model.config["landscape_only"] is False
    check_parity(model, network)
    check_parity(model, network, "b1_80x48_portrait")  # ManyAR_PatchEmbed's training form runs as inference form


def test_allow_list_reads_tensors_exactly_and_refuses_code(tmp_path):
    tensors = {"f": torch.randn(3, 4), "h": torch.randn(5).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False]), "empty": torch.zeros(0)}
    tensors["view"] = tensors["f"][1:, ::2]  # a strided view into a shared storage
    tensors["param"] = torch.nn.Parameter(torch.ones(2))
    torch.save({"t": tensors, "size": torch.Size([2]), "dtype": torch.float16, "set": {1, 2}, "bytes": b"\x00\xff"},
               tmp_path / "a.pt")
    loaded = hub.load_torch_file(tmp_path / "a.pt")
    for key, value in tensors.items():
        assert loaded["t"][key].dtype == value.dtype and torch.equal(loaded["t"][key], value), key
    assert isinstance(loaded["t"]["param"], torch.nn.Parameter)
    assert loaded["size"] == torch.Size([2]) and loaded["dtype"] is torch.float16 and loaded["bytes"] == b"\x00\xff"
    # the legacy (pre-zip) format goes through torch's weights_only reader
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(hub.load_torch_file(tmp_path / "legacy.pt")["view"], tensors["view"])
    torch.save({"state_dict": {}, "hook": os.system}, tmp_path / "code.ckpt")
    with pytest.raises(ValueError, match=r"code\.ckpt: cannot read this checkpoint safely.*'posix\.system'"):
        hub.load_torch_file(tmp_path / "code.ckpt")


# --------------------------------------------------------------------------------------------
# FeatUp dino16 Lightning checkpoints and DINO's ViT-S/16 file


@contextlib.contextmanager
def foreign_classes(monkeypatch):
    """Stand-ins of Lightning / omegaconf classes under their real module names, importable only while a
    checkpoint is written (neither package is installed here, as on many users' machines)."""
    modules = {}

    def define(module: str, name: str, base: type = object) -> type:
        for depth in range(1, module.count(".") + 2):
            parent = ".".join(module.split(".")[:depth])
            modules.setdefault(parent, types.ModuleType(parent))
        cls = type(name, (base,), {"__module__": module, "__qualname__": name})
        setattr(modules[module], name, cls)
        return cls

    classes = types.SimpleNamespace(
        ModelCheckpoint=define("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
        AttributeDict=define("pytorch_lightning.utilities.parsing", "AttributeDict", dict),
        DictConfig=define("omegaconf.dictconfig", "DictConfig"),
        ContainerMetadata=define("omegaconf.base", "ContainerMetadata"),
        AnyNode=define("omegaconf.nodes", "AnyNode"),
    )
    with monkeypatch.context() as patch:
        for name, module in modules.items():
            patch.setitem(sys.modules, name, module)
        yield classes


def omegaconf_config(classes, values: dict):
    """An object pickled the way omegaconf pickles a DictConfig (metadata, nodes, typing.Any, defaultdict)."""
    def metadata():
        meta = classes.ContainerMetadata()
        meta.__dict__.update(ref_type=typing.Any, object_type=dict, optional=True, key=None, flags={},
                             resolver_cache=collections.defaultdict(dict), key_type=typing.Any,
                             element_type=typing.Any)
        return meta

    config = classes.DictConfig()
    nodes = {}
    for key, value in values.items():
        nodes[key] = classes.AnyNode()
        nodes[key].__dict__.update(_val=value, _metadata=metadata(), _parent=config)
    config.__dict__.update(_metadata=metadata(), _parent=None, _content=nodes)
    return config


TRAINING_ONLY = {"downsampler.kernel_size": torch.tensor(16), "downsampler.attention_net.0.weight": torch.randn(1, 384),
                 "downsampler.fixup_proj.weight": torch.randn(384, 384, 1, 1), "scale_net.net.weight": torch.randn(1),
                 "scale_net.net.bias": torch.randn(1)}


def lightning_checkpoint(state_dict: dict, old_style=None) -> dict:
    """FeatUp's Lightning container: state_dict + training-only modules, callbacks, optimizer, loops, versions.
    `old_style` (the foreign classes) writes an older Lightning's form: callbacks keyed by the callback class,
    numpy scores, AttributeDict / omegaconf hyper-parameters."""
    upsampler = [v for k, v in state_dict.items() if k.startswith("upsampler.")]
    checkpoint = {
        "epoch": 0, "global_step": 2000, "pytorch-lightning_version": "2.1.3",
        "state_dict": collections.OrderedDict({**state_dict, **TRAINING_ONLY}),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 2000},
                               "epoch_progress": {"total": {"ready": 1, "started": 1, "processed": 0, "completed": 0},
                                                  "current": {"ready": 1, "started": 1, "processed": 0,
                                                              "completed": 0}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 500, "
                      "'every_n_epochs': 0, 'train_time_interval': None}": {
                          "monitor": None, "best_model_score": None, "best_model_path": "", "current_score": None,
                          "dirpath": "/checkpoints/jbu", "best_k_models": {}, "kth_best_model_path": "",
                          "kth_value": torch.tensor(float("inf")), "last_model_path": ""}},
        "optimizer_states": [{
            "state": {i: {"step": torch.tensor(2000.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)}
                      for i, v in enumerate(upsampler)},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                              "params": list(range(len(upsampler)))}]}],
        "lr_schedulers": [],
    }
    if old_style is not None:
        checkpoint["pytorch-lightning_version"] = "1.4.9"
        checkpoint["callbacks"] = {old_style.ModelCheckpoint: {"best_model_score": np.float64(0.25),
                                                               "best_model_path": "epoch=0.ckpt"}}
        checkpoint["hparams_name"] = "kwargs"
        checkpoint["hyper_parameters"] = old_style.AttributeDict(
            cfg=omegaconf_config(old_style, {"model_type": "dino16", "upsampler_type": "jbu_stack", "lr": 1e-3}))
    return checkpoint


@pytest.fixture(scope="module")
def featup_state_dict() -> dict[str, torch.Tensor]:
    return standin_state_dict(("featup", "dino16_jbu.manifest.json"), seed=0)


def dino_file(featup_state_dict) -> dict[str, torch.Tensor]:
    """DINO's plain state dict: the stand-in backbone under its own 150 names."""
    return {k: featup_state_dict[f"model.0.model.{k}"] for k in DINO_KEYS}


def test_dino_file_names():
    assert len(DINO_KEYS) == len(set(DINO_KEYS)) == 150
    state_dict = DinoVisionTransformer().state_dict()
    assert set(state_dict) == set(DINO_KEYS) and state_dict["pos_embed"].shape == (1, 197, 384)


FORMS = {
    "with_backbone": lambda sd: dict(sd),
    "without_backbone": lambda sd: {k: v for k, v in sd.items() if not k.startswith("model.0.")},
    "upsampler_only": lambda sd: {k: v for k, v in sd.items() if k.startswith("upsampler.")},
}


@pytest.fixture
def torch_hub_cache(tmp_path, monkeypatch):
    """An empty torch hub checkpoint folder (TORCH_HOME) that can never download anything."""
    def no_network(*args, **kwargs):
        raise AssertionError("no download expected")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(hub, "check_connection", no_network)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


@pytest.mark.parametrize("form", FORMS)
def test_featup_lightning_checkpoint_from_the_default_url(torch_hub_cache, featup_state_dict, form):
    torch.save(lightning_checkpoint(FORMS[form](featup_state_dict)), torch_hub_cache / FEATUP_CACHE_FILE_NAMES[True])
    torch.save(dino_file(featup_state_dict), torch_hub_cache / os.path.basename(DINO_CHECKPOINT_URL))
    model = DinoFeatUp.from_pretrained()
    assert not model.training
    data = load_tensors("featup", "single_bird_96x160.safetensors")
    with torch.no_grad():
        tokens = model.model[0](data["img_norm"])
        low_res = model.low_res(data["img_norm"])
        features = model.upsample(low_res, data["img_norm"])  # the seed's guidance (92a75c6)
    assert (tokens - data["tokens"]).abs().max() <= 1e-5
    norm = model.model[1].norm
    if form == "upsampler_only":
        # no ChannelNorm weights in the file: the defaults stay, as the original's strict=False load leaves them
        assert torch.equal(norm.weight, torch.ones(384)) and torch.equal(norm.bias, torch.zeros(384))
        reference = DinoFeatUp()
        reference.load_state_dict({**featup_state_dict, "model.1.norm.weight": torch.ones(384),
                                   "model.1.norm.bias": torch.zeros(384)})
        with torch.no_grad():
            expected = reference.eval().upsample(reference.low_res(data["img_norm"]), data["img_norm"])
        assert torch.equal(features, expected)
        assert (low_res - F.layer_norm(data["tokens"].permute(0, 2, 3, 1), (384,)).permute(0, 3, 1, 2)).abs().max() <= 1e-5
    else:
        assert torch.equal(norm.weight, featup_state_dict["model.1.norm.weight"])
        assert (low_res - data["lr"]).abs().max() <= 1e-5
        assert (features[:, data["channels"]] - data["92a75c6/hr"]).abs().max() <= 5e-5


@pytest.mark.parametrize("form", FORMS)
def test_older_lightning_and_omegaconf_containers_load_the_same_weights(torch_hub_cache, monkeypatch,
                                                                       featup_state_dict, form):
    """Callbacks keyed by the callback class, numpy scores, AttributeDict / omegaconf hyper-parameters:
    weights_only=True refuses them; the allow-list reads them (as inert placeholders) without importing
    Lightning or omegaconf."""
    torch.save(dino_file(featup_state_dict), torch_hub_cache / os.path.basename(DINO_CHECKPOINT_URL))
    torch.save(lightning_checkpoint(FORMS[form](featup_state_dict)), torch_hub_cache / "modern.ckpt")
    with foreign_classes(monkeypatch) as classes:
        torch.save(lightning_checkpoint(FORMS[form](featup_state_dict), classes),
                   torch_hub_cache / FEATUP_CACHE_FILE_NAMES[True])
    assert "omegaconf" not in sys.modules and "pytorch_lightning" not in sys.modules
    with pytest.raises(Exception, match="omegaconf|pytorch_lightning|numpy"):
        torch.load(torch_hub_cache / FEATUP_CACHE_FILE_NAMES[True], weights_only=True)
    container = hub.load_torch_file(torch_hub_cache / FEATUP_CACHE_FILE_NAMES[True])
    (callback_class,) = container["callbacks"]
    assert callback_class.__qualname__ == "ModelCheckpoint" and isinstance(container["hyper_parameters"],
                                                                           hub.OpaqueObject)
    expected = DinoFeatUp.from_pretrained(torch_hub_cache / "modern.ckpt").state_dict()
    loaded = DinoFeatUp.from_pretrained().state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)
    assert "omegaconf" not in sys.modules and "pytorch_lightning" not in sys.modules


def test_featup_no_norm_checkpoint_from_the_default_url(torch_hub_cache, featup_state_dict):
    no_norm = {k.replace("model.0.model.", "model.model."): v for k, v in featup_state_dict.items()
               if not k.startswith("model.1.")}
    torch.save(lightning_checkpoint(no_norm), torch_hub_cache / FEATUP_CACHE_FILE_NAMES[False])
    model = DinoFeatUp.from_pretrained(use_norm=False)
    data = load_tensors("featup", "single_bird_96x160.safetensors")
    with torch.no_grad():
        assert (model.low_res(data["img_norm"]) - data["tokens"]).abs().max() <= 1e-5


def test_the_other_variant_in_the_cache_is_never_used(tmp_path, monkeypatch, featup_state_dict):
    """The original's torch hub cache holds one `dino16_jbu_stack_cocostuff.ckpt` for both variants. Here each
    variant has its own cache file: a file of the other variant is not picked up, or, where its keys tell,
    refused with a clear error."""
    cache = tmp_path / "checkpoints"
    cache.mkdir()
    upsampler_only = FORMS["upsampler_only"]
    with_norm = upsampler_only(featup_state_dict)
    without_norm = upsampler_only(standin_state_dict(("featup", "dino16_jbu.manifest.json"), seed=1))
    served = {FEATUP_CHECKPOINT_URL: with_norm, FEATUP_NO_NORM_CHECKPOINT_URL: without_norm}
    downloads = []

    def server(url, dst, *args, **kwargs):
        downloads.append(url)
        if url == DINO_CHECKPOINT_URL:
            torch.save(dino_file(featup_state_dict), dst)
        else:
            torch.save(lightning_checkpoint(served[url]), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", server)
    monkeypatch.setattr(hub, "check_connection", lambda url: None)
    # what the original FeatUp hub code leaves behind after use_norm=True: the shared file name
    torch.save(lightning_checkpoint(with_norm), cache / "dino16_jbu_stack_cocostuff.ckpt")
    model = DinoFeatUp.from_pretrained(cache_dir=cache, use_norm=False)
    assert downloads == [FEATUP_NO_NORM_CHECKPOINT_URL, DINO_CHECKPOINT_URL]
    assert torch.equal(model.upsampler.up1.range_temp, without_norm["upsampler.up1.range_temp"])
    assert not torch.equal(without_norm["upsampler.up1.range_temp"], with_norm["upsampler.up1.range_temp"])
    model = DinoFeatUp.from_pretrained(cache_dir=cache, use_norm=True)
    assert downloads[2:] == [FEATUP_CHECKPOINT_URL]
    assert torch.equal(model.upsampler.up1.range_temp, with_norm["upsampler.up1.range_temp"])
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ["dino16_jbu_stack_cocostuff.ckpt", "dino_deitsmall16_pretrain.pth", *FEATUP_CACHE_FILE_NAMES.values()])

    # a file put by hand under the wrong variant's name is refused when its keys tell the variant
    with_backbone = lightning_checkpoint(featup_state_dict)
    torch.save(with_backbone, cache / FEATUP_CACHE_FILE_NAMES[False])
    with pytest.raises(ValueError, match=r"use_norm=True checkpoint .* use_norm=False was asked"):
        DinoFeatUp.from_pretrained(cache_dir=cache, use_norm=False)
    no_norm = {k.replace("model.0.model.", "model.model."): v for k, v in featup_state_dict.items()
               if not k.startswith("model.1.")}
    torch.save(lightning_checkpoint(no_norm), cache / FEATUP_CACHE_FILE_NAMES[True])
    with pytest.raises(ValueError, match=r"use_norm=False checkpoint .* use_norm=True was asked"):
        DinoFeatUp.from_pretrained(cache_dir=cache, use_norm=True)
    assert len(downloads) == 3


# --------------------------------------------------------------------------------------------
# download_weights: preparing an offline machine


def test_download_weights_fills_the_caches_a_later_offline_load_uses(tmp_path, monkeypatch, hub_files,
                                                                    featup_state_dict):
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    requested = []

    def hf_server(repo_id, filename, revision=None, cache_dir=None, local_files_only=False, **kwargs):
        requested.append((repo_id, filename, revision, local_files_only))
        snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
        if not snapshot.exists():
            place_in_hf_cache(cache, repo_id, hub_files["mast3r"])
        return str(snapshot / filename)

    def url_server(url, dst, *args, **kwargs):
        if url == DINO_CHECKPOINT_URL:
            torch.save(dino_file(featup_state_dict), dst)
        else:
            torch.save(lightning_checkpoint(FORMS["without_backbone"](featup_state_dict)), dst)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_server)
    monkeypatch.setattr(hub, "check_connection", lambda url: None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", url_server)
    fetched = hub.download_weights(cache_dir=cache)
    assert sorted(fetched) == ["backbone_config", "backbone_weights", "dino", "featup"]
    assert all(not offline for *_, offline in requested)
    for entry in fetched.values():
        assert entry["sha256"] == hashlib.sha256(open(entry["path"], "rb").read()).hexdigest()
    assert fetched["backbone_weights"]["revision"] == COMMIT
    assert fetched["backbone_config"]["source"] == f"hf://{hub.DEFAULT_REPO_IDS['mast3r']}/config.json"
    assert fetched["featup"]["source"] == FEATUP_CHECKPOINT_URL
    assert os.path.basename(fetched["featup"]["path"]) == FEATUP_CACHE_FILE_NAMES[True]
    json.dumps(fetched)  # printable by the CLI

    # later, without network: everything comes from those caches
    def no_network(*args, **kwargs):
        raise AssertionError("no download expected")

    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(hub, "check_connection", no_network)
    check_parity(MASt3R.from_pretrained(hub.DEFAULT_REPO_IDS["mast3r"], cache_dir=cache), "mast3r")
    features = DinoFeatUp.from_pretrained(cache_dir=cache)
    assert torch.equal(features.upsampler.up4.sigma_spatial, featup_state_dict["upsampler.up4.sigma_spatial"])
    with pytest.raises(ValueError, match="backbone must be one of"):
        hub.download_weights(backbone="vggt")


def test_download_weights_fails_fast_offline(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, no network (a closed port as the endpoint): the offline message, at once."""
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        hub.download_weights(cache_dir=tmp_path / "empty")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "no network connection" in message and hub.DEFAULT_REPO_IDS["mast3r"] in message
    assert "hf download" in message and ".pth" in message and str(tmp_path / "empty") in message
