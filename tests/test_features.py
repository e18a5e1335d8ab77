"""DINO ViT-S/16 + FeatUp JBU features: parity with ../shared/parity/featup, loading, edge cases."""
from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F
from _parity import load_json, load_tensors, standin_state_dict

from met3r_diffusers.models import DinoFeatUp
from met3r_diffusers.models.dino import DinoFeaturizer
from met3r_diffusers.models.featup import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JBUStack,
    _adaptive_conv,
    _AdaptiveConv,
    _WindowDot,
)

MANIFEST = ("featup", "dino16_jbu.manifest.json")
FEATURE_FILES = ["single_bird_96x160.safetensors", "pair_bird_128x128.safetensors", "pair_cones_128x128.safetensors"]
PATHS = ["92a75c6", "HEAD"]  # guidance: normalised image / [0, 1] image
STAGE_TOL, LR_TOL, STATS_TOL = 5e-5, 1e-5, 1e-5


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return standin_state_dict(MANIFEST, seed=0)


@pytest.fixture(scope="module")
def model(state_dict) -> DinoFeatUp:
    model = DinoFeatUp()
    model.load_state_dict(state_dict)
    return model.eval().requires_grad_(False)


def normalise(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MEt3R's input convention: [-1, 1] -> [0, 1] -> ImageNet normalisation."""
    img01 = (img + 1) / 2
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return img01, (img01 - mean) / std


def guidance_for(path: str, img01: torch.Tensor, img_norm: torch.Tensor) -> torch.Tensor:
    return img_norm if path == "92a75c6" else img01


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ------------------------------------------------------------------ DINO


def reference_pos_embed(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Hand-written separable cubic (a=-0.75, clamped) at src = (dst + 0.5) * 14 / (n + 0.1) - 0.5."""

    def weights(n: int) -> torch.Tensor:
        dst = torch.arange(n, dtype=torch.float64)
        src = (dst + 0.5) * 14 / (n + 0.1) - 0.5
        matrix = torch.zeros(n, 14, dtype=torch.float64)
        for k in range(-1, 3):
            tap = src.floor() + k
            d = (src - tap).abs()
            w = torch.where(d <= 1, (1.25 * d - 2.25) * d * d + 1, ((-0.75 * d + 3.75) * d - 6) * d + 3)
            matrix.index_put_((torch.arange(n), tap.long().clamp(0, 13)), w, accumulate=True)
        return matrix

    grid = table[0, 1:].double().reshape(14, 14, -1)
    grid = torch.einsum("yi,xj,ijc->yxc", weights(height), weights(width), grid).reshape(height * width, -1)
    return torch.cat([table[0, :1].double(), grid]).unsqueeze(0)


def test_pos_embed_matches_fixture_and_reference(model):
    vit = model.model[0].model
    for key, expected in load_tensors("featup", "posembed.safetensors").items():
        height, width = (int(v) // 16 for v in key.split("/")[1].split("x"))
        table = vit.interpolate_pos_embed(height, width)
        assert max_abs(table, expected) <= 1e-6, key
        if (height, width) != (14, 14):
            assert max_abs(table.double(), reference_pos_embed(vit.pos_embed, height, width)) <= 1e-6
    assert torch.equal(vit.interpolate_pos_embed(14, 14), vit.pos_embed)  # 224x224 uses the table as is


@pytest.mark.parametrize("name", FEATURE_FILES)
def test_tokens_and_low_res(model, name):
    data = load_tensors("featup", name)
    _, img_norm = normalise(data["img"])
    assert torch.equal(img_norm, data["img_norm"])  # the normalisation recipe is bit-exact
    with torch.no_grad():
        tokens = model.model[0](img_norm)
        low_res = model.low_res(img_norm)
    assert max_abs(tokens, data["tokens"]) <= LR_TOL
    assert max_abs(low_res, data["lr"]) <= LR_TOL


@pytest.mark.parametrize("size", [(48, 80), (112, 144), (144, 128), (240, 240)])
def test_odd_patch_rows_are_computed_without_crop(model, size):
    """The original drops a patch row and column when H/16 is odd (and then fails); ours does not."""
    height, width = size[0] // 16, size[1] // 16
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    vit = model.model[0].model
    assert max_abs(vit.interpolate_pos_embed(height, width).double(),
                   reference_pos_embed(vit.pos_embed, height, width)) <= 1e-6
    with torch.no_grad():
        low_res = model.low_res(images)
        features = model.upsample(low_res, images)
        # every patch is a token of the same forward: the top-left patches do not depend on a crop
        top = model.low_res(images[:, :, : 16 * (height - 1)])
    assert low_res.shape == (1, 384, height, width)
    assert features.shape == (1, 384, *size)
    assert torch.isfinite(features).all()
    assert not torch.allclose(top, low_res[:, :, : height - 1], atol=1e-3)  # attention sees the whole image


def test_bad_image_sizes(model):
    with pytest.raises(ValueError, match="multiples of 16"):
        model.low_res(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.low_res(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="at least 2x2"):
        model(torch.zeros(1, 3, 16, 48))
    with pytest.raises(ValueError, match="guidance"):
        model.upsample(torch.zeros(2, 384, 2, 2), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="low_res"):
        model.upsample(torch.zeros(1, 8, 2, 2), torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------------ JBU stack


@pytest.mark.parametrize("name", FEATURE_FILES)
@pytest.mark.parametrize("path", PATHS)
def test_each_jbu_stage_in_isolation(model, name, path):
    """Stage k on the stored channels of stage k-1 (stages work channel by channel)."""
    data = load_tensors("featup", name)
    img01, img_norm = normalise(data["img"])
    guidance = guidance_for(path, img01, img_norm)
    source = data["lr"][:, data["channels"]]
    stages = [model.upsampler.up1, model.upsampler.up2, model.upsampler.up3, model.upsampler.up4]
    with torch.no_grad():
        for k, stage in enumerate(stages, 1):
            pooled = F.adaptive_avg_pool2d(guidance, (2 * source.shape[-2], 2 * source.shape[-1]))
            if f"{path}/kernel{k}" in data:
                expected = data[f"{path}/kernel{k}"]
                assert max_abs(stage.kernel(pooled).reshape(expected.shape), expected) <= STAGE_TOL
            output = stage(source, pooled)
            assert max_abs(output, data[f"{path}/up{k}"]) <= STAGE_TOL, f"up{k}"
            source = data[f"{path}/up{k}"]


@pytest.mark.parametrize("name", FEATURE_FILES)
@pytest.mark.parametrize("path", PATHS)
def test_final_features_and_stage_statistics(model, name, path):
    data = load_tensors("featup", name)
    img01, img_norm = normalise(data["img"])
    guidance = guidance_for(path, img01, img_norm)
    with torch.no_grad():
        low_res = model.low_res(img_norm)
        source = low_res
        for k, stage in enumerate([model.upsampler.up1, model.upsampler.up2, model.upsampler.up3,
                                   model.upsampler.up4], 1):
            source = stage(source, F.adaptive_avg_pool2d(guidance, (2 * source.shape[-2], 2 * source.shape[-1])))
            assert max_abs(source.mean((2, 3)), data[f"{path}/stats/up{k}/mean"]) <= STATS_TOL
            assert max_abs(source.square().mean((2, 3)).sqrt(), data[f"{path}/stats/up{k}/rms"]) <= STATS_TOL
        features = model.upsample(low_res, guidance)
    if path == "92a75c6":
        assert torch.equal(features, model(img_norm))  # forward = upsample(low_res(x), x)
    assert features.shape == data["img"].shape[:1] + (384,) + data["img"].shape[2:]
    assert max_abs(features[:, data["channels"]], data[f"{path}/hr"]) <= STAGE_TOL
    assert max_abs(features[:, :, 8::16, 8::16], data[f"{path}/hr_grid16"]) <= STAGE_TOL
    assert max_abs(features.mean((2, 3)), data[f"{path}/stats/hr/mean"]) <= STATS_TOL
    assert max_abs(features.square().mean((2, 3)).sqrt(), data[f"{path}/stats/hr/rms"]) <= STATS_TOL


@pytest.mark.parametrize("path", PATHS)
def test_input_gradient(model, path):
    data = load_tensors("featup", "grad_bird_64x64.safetensors")
    img = data["img"].clone().requires_grad_()
    img01, img_norm = normalise(img)
    features = model.upsample(model.low_res(img_norm), guidance_for(path, img01, img_norm))
    assert max_abs(features[:, data["channels"]].detach(), data[f"{path}/hr"]) <= STAGE_TOL
    loss = (features[:, data["channels"]] * data["G"]).sum()
    loss.backward()
    expected = data[f"{path}/grad_img"]
    assert abs(loss.item() - data[f"{path}/loss"].item()) <= 1e-5 * abs(data[f"{path}/loss"].item())
    assert max_abs(img.grad, expected) <= 1e-4 * expected.abs().max().item()


def test_adaptive_conv_op_and_gradients():
    data = load_tensors("featup", "adaptive_conv_op.safetensors")
    prefix = "2x5x9x11/"
    padded = data[prefix + "input"].clone().requires_grad_()
    filters = data[prefix + "filters"].clone().requires_grad_()
    output = _adaptive_conv(padded, filters)
    assert max_abs(output.detach(), data[prefix + "output"]) <= 1e-5
    output.backward(data[prefix + "grad_output"])
    assert max_abs(padded.grad, data[prefix + "grad_input"]) <= 1e-5
    assert max_abs(filters.grad, data[prefix + "grad_filters"]) <= 1e-5


def dense_upsample_conv(source, kernel, radius):
    """Unfold-based reference of one JBU convolution (bicubic resize, reflect pad, 7x7 per-pixel kernel)."""
    batch, height, width, taps = kernel.shape
    upsampled = F.interpolate(source, (height, width), mode="bicubic", align_corners=False)
    padded = F.pad(upsampled, [radius] * 4, mode="reflect")
    patches = F.unfold(padded, 2 * radius + 1).view(batch, source.shape[1], taps, height, width)
    return torch.einsum("bcphw,bhwp->bhwc", patches, kernel)


def test_sparse_operations_match_dense_reference_and_gradcheck():
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    kernel = torch.randn(2, 8, 10, 49, dtype=torch.float64, generator=generator, requires_grad=True)
    out = _AdaptiveConv.apply(source, kernel, 3, True)
    assert max_abs(out, dense_upsample_conv(source, kernel, 3)) <= 1e-12
    # gradcheck on a small case (radius 1: 3x3 windows)
    small_source, small_kernel = source[:1, :2, :2, :3], kernel[:1, :4, :6, :9]
    assert torch.autograd.gradcheck(lambda s, k: _AdaptiveConv.apply(s, k, 1, True), (small_source, small_kernel))

    keys = torch.randn(1, 4, 6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    padded = F.pad(keys.permute(0, 3, 1, 2), [3] * 4, mode="reflect")
    reference = torch.einsum("bcphw,bchw->bhwp", F.unfold(padded, 7).view(1, 3, 49, 4, 6), keys.permute(0, 3, 1, 2))
    assert max_abs(_WindowDot.apply(keys, 3), reference) <= 1e-12
    assert torch.autograd.gradcheck(lambda k: _WindowDot.apply(k, 3), (keys,))


def test_reduced_precision_runs_in_float32():
    generator = torch.Generator().manual_seed(0)
    padded = torch.randn(1, 4, 10, 11, generator=generator)
    filters = torch.randn(1, 4, 5, 7, 7, generator=generator)
    out = _adaptive_conv(padded.bfloat16(), filters.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = _adaptive_conv(padded.bfloat16().float(), filters.bfloat16().float())
    assert max_abs(out.float(), expected) <= 0.02 * expected.abs().max().item()


def test_adaptive_conv_under_bf16_autocast_computes_in_float32(model):
    """Under CPU bf16 autocast (the CLI's --bf16) the fold's einsums are not cast: same result as without."""
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(2, 8, 5, 6, generator=generator)
    kernel = torch.softmax(torch.randn(2, 10, 12, 49, generator=generator), -1)
    expected = _AdaptiveConv.apply(source, kernel, 3, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _AdaptiveConv.apply(source, kernel, 3, True)
        features = model(torch.randn(1, 3, 32, 48, generator=generator))
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert features.shape == (1, 384, 32, 48) and torch.isfinite(features).all()


def test_train_mode_fixup_path_matches_eval(model):
    """Without dropout, the training-mode (unfused) final fixup equals the eval-mode fused one."""
    images = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout2d)]
        rates = [m.p for m in dropouts]
        for m in dropouts:
            m.p = 0.0
        try:
            train_features = model.train()(images)
        finally:
            model.eval()
            for m, p in zip(dropouts, rates):
                m.p = p
    assert max_abs(train_features, expected) <= 1e-5


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_weight_free_upsamplers(state_dict, mode):
    model = DinoFeatUp(upsampler=mode)
    assert not any(k.startswith("upsampler.") for k in model.state_dict())
    model.load_state_dict(state_dict)  # the official names; upsampler.* is ignored
    images = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        low_res = model.low_res(images)
        features = model(images)
    corners = {} if mode == "nearest" else {"align_corners": False}
    assert torch.equal(features, F.interpolate(low_res, (32, 64), mode=mode, **corners))


# ------------------------------------------------------------------ loading


def test_state_dict_names_match_official_manifest(state_dict):
    manifest = load_json(*MANIFEST)["tensors"]
    ours = DinoFeatUp().state_dict()
    assert sorted(ours) == sorted(manifest)
    assert all(list(ours[k].shape) == manifest[k]["shape"] for k in ours)


def test_load_drops_training_only_keys_and_reports_others(state_dict):
    model = DinoFeatUp()
    extra = {"scale_net.net.weight": torch.zeros(1, 384, 1, 1), "downsampler.kernel": torch.zeros(3)}
    model.load_state_dict({**state_dict, **extra})
    assert torch.equal(model.upsampler.up1.range_temp, state_dict["upsampler.up1.range_temp"])

    missing = {k: v for k, v in state_dict.items() if k != "model.1.norm.bias"}
    with pytest.raises(ValueError, match=r"1 missing keys: model\.1\.norm\.bias"):
        model.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"1 unexpected keys: crf\.weight"):
        model.load_state_dict({**state_dict, "crf.weight": torch.zeros(1)})
    result = model.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["model.1.norm.bias"]


def test_without_channel_norm(state_dict):
    model = DinoFeatUp(use_norm=False)
    names = set(model.state_dict())
    assert "model.model.pos_embed" in names and not any(k.startswith("model.1.") for k in names)
    dino = {k.replace("model.0.model.", "model.model."): v for k, v in state_dict.items() if k.startswith("model.0.")}
    upsampler = {k: v for k, v in state_dict.items() if k.startswith("upsampler.")}
    model.load_state_dict({**dino, **upsampler})
    data = load_tensors("featup", "single_bird_96x160.safetensors")
    with torch.no_grad():
        assert max_abs(model.low_res(data["img_norm"]), data["tokens"]) <= LR_TOL


def test_from_pretrained_local_lightning_checkpoint(tmp_path, state_dict, model):
    path = tmp_path / "dino16_jbu_stack_cocostuff.ckpt"
    torch.save({"epoch": 3, "state_dict": {**state_dict, "scale_net.net.bias": torch.zeros(1)}}, path)
    loaded = DinoFeatUp.from_pretrained(path)
    assert not loaded.training
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))

    # a checkpoint without the DINO backbone gets DINO's own ViT-S/16 weights
    without_dino = {k: v for k, v in state_dict.items() if not k.startswith("model.0.")}
    torch.save({"state_dict": without_dino}, path)
    dino_path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save({k[len("model.0.model."):]: v for k, v in state_dict.items() if k.startswith("model.0.")}, dino_path)
    loaded = DinoFeatUp.from_pretrained(path, dino_path_or_url=dino_path)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))

    with pytest.raises(FileNotFoundError, match="does not exist"):
        DinoFeatUp.from_pretrained(tmp_path / "nothing.ckpt")


def test_from_pretrained_local_safetensors(tmp_path, state_dict):
    from safetensors.torch import save_file

    path = tmp_path / "dino16_jbu.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    loaded = DinoFeatUp.from_pretrained(path)
    assert not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state_dict.items())


def test_from_pretrained_url_uses_cache_and_explains_offline(tmp_path, monkeypatch, state_dict):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = "https://example.invalid/pretrained/dino16_jbu_stack_cocostuff.ckpt"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "dino16_jbu_stack_cocostuff.ckpt")):
        DinoFeatUp.from_pretrained(url, cache_dir=tmp_path)
    torch.save({"state_dict": state_dict}, tmp_path / "dino16_jbu_stack_cocostuff.ckpt")  # as if cached
    loaded = DinoFeatUp.from_pretrained(url, cache_dir=tmp_path)
    assert torch.equal(loaded.model[1].norm.weight, state_dict["model.1.norm.weight"])


def test_constructor_arguments():
    with pytest.raises(ValueError, match="feature_backbone"):
        DinoFeatUp(feature_backbone="dinov2")
    with pytest.raises(ValueError, match="upsampler"):
        DinoFeatUp(upsampler="lanczos")
    with pytest.raises(TypeError, match="use_norm"):
        DinoFeatUp(use_norm="yes")
    assert isinstance(DinoFeatUp().model[0], DinoFeaturizer)


def test_eval_fixup_with_only_its_bias_trainable():
    """The eval-mode fixup adds its bias out of place whenever a gradient may flow through it."""
    stack = JBUStack(dim=4).eval()
    for name, parameter in stack.named_parameters():
        parameter.requires_grad_(name == "fixup_proj.1.bias")
    generator = torch.Generator().manual_seed(0)
    source, guidance = torch.randn(1, 4, 2, 2, generator=generator), torch.randn(1, 3, 32, 32, generator=generator)
    out = stack(source, guidance)
    out.sum().backward()
    assert torch.equal(stack.fixup_proj[1].bias.grad, torch.full((4,), 0.1 * 32 * 32))
    with torch.no_grad():
        assert torch.equal(stack(source, guidance), out.detach())


def test_truncated_featup_files_name_the_file(tmp_path, state_dict):
    from safetensors.torch import save_file

    ckpt, safetensors = tmp_path / "featup.ckpt", tmp_path / "featup.safetensors"
    torch.save({"state_dict": state_dict}, ckpt)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(safetensors))
    for path in (ckpt, safetensors):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="truncated") as err:
            DinoFeatUp.from_pretrained(path)
        assert str(path) in str(err.value)


def test_a_file_that_is_not_featup_is_refused_before_any_download(tmp_path, monkeypatch, state_dict):
    def no_network(*args, **kwargs):
        raise AssertionError("no download expected")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    dino = tmp_path / "dino_deitsmall16_pretrain.pth"  # DINO's own file passed as the FeatUp checkpoint
    torch.save({k[len("model.0.model."):]: v for k, v in state_dict.items() if k.startswith("model.0.")}, dino)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, other)
    for path in (dino, other):
        with pytest.raises(ValueError, match="not a FeatUp dino16 checkpoint") as err:
            DinoFeatUp.from_pretrained(path, cache_dir=tmp_path / "empty")
        assert str(path) in str(err.value)


def test_featup_url_without_network_fails_fast(tmp_path):
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"put it at .*dino16_jbu_stack_cocostuff\.ckpt"):
        DinoFeatUp.from_pretrained(f"http://127.0.0.1:{port}/no_norm/dino16_jbu_stack_cocostuff.ckpt",
                                   cache_dir=tmp_path, use_norm=False, dino_path_or_url=tmp_path / "x.pth")
    assert time.perf_counter() - start < 10
