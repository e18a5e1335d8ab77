"""Regression tests for bad inputs and faults found by a fault hunt over the Python API (each failed before its fix)."""
from __future__ import annotations

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch

from met3r_diffusers import MEt3R, MEt3RLoss, MEt3RMetric, functional
from met3r_diffusers.diffusion import ViewLayout, predict_x0
from met3r_diffusers.loss import guidance_direction
from met3r_diffusers.testing import FeatureConsistencyMetric, PlaneGeometry, TinyFeatures, tiny_met3r


def _views(batch=3, num_views=3, size=32, seed=0):
    return torch.rand(batch, num_views, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("distance", ["psnr", "mse"])
def test_torchmetrics_metric_for_rgb_distances(distance):
    evaluator = MEt3RMetric(tiny_met3r(distance=distance))
    assert evaluator.higher_is_better is (distance == "psnr") and MEt3RMetric.higher_is_better is False
    evaluator.update(_views(batch=1))
    assert math.isfinite(float(evaluator.compute()["score"]))


def test_torchmetrics_metric_keeps_network_weights_out_of_its_state_and_mode():
    metric = tiny_met3r(freeze=False)
    metric.eval()
    evaluator = MEt3RMetric(metric)
    assert not any(key.startswith("metric.") for key in evaluator.state_dict())
    evaluator.train()
    assert not metric.training
    evaluator.to(torch.float64)
    assert metric.dtype == torch.float64  # .to() still moves it
    value = evaluator(_views(batch=1).double().requires_grad_(True))  # forward: the batch value, with gradient
    assert value["score"].requires_grad
    evaluator.reset()
    assert evaluator.last_output is None


def test_a_gated_out_nan_sample_does_not_poison_the_loss():
    views = _views()
    views[1] = math.nan
    timesteps = torch.tensor([100, 900, 100])
    loss = MEt3RLoss(tiny_met3r(), max_timestep=500)(views, timesteps=timesteps)
    per_sample = MEt3RLoss(tiny_met3r(), max_timestep=500, reduction="none")(views, timesteps=timesteps)
    assert math.isfinite(float(loss)) and per_sample[1] == 0 and torch.isfinite(per_sample).all()


@pytest.mark.parametrize("to_bf16", [False, True])
def test_views_more_precise_than_the_metric(to_bf16):
    metric = tiny_met3r().to(torch.bfloat16) if to_bf16 else tiny_met3r()
    loss = MEt3RLoss(metric)(_views(batch=1).double())
    assert math.isfinite(float(loss))


def test_metric_and_callback_pickle():
    from met3r_diffusers.callbacks import MEt3RCallback

    metric = tiny_met3r()
    restored = pickle.loads(pickle.dumps(metric))
    views = _views(batch=1)
    torch.testing.assert_close(restored(views).score, metric(views).score)
    pickle.loads(pickle.dumps(MEt3RCallback(metric, num_views=2)))
    copy.deepcopy(MEt3RMetric(metric))


@pytest.mark.parametrize("timestep", [math.nan, math.inf])
def test_predict_x0_refuses_non_finite_timesteps(timestep):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    sample = torch.randn(1, 4, 4, 4)
    for scheduler in (DDIMScheduler(), FlowMatchEulerDiscreteScheduler()):
        with pytest.raises(ValueError, match="timesteps"):
            predict_x0(sample, sample, torch.tensor([timestep]), scheduler)


def test_guidance_direction_checks_and_half_precision():
    grad = torch.randn(4, 8)
    for bad in (math.nan, -1.0, 0.0):
        with pytest.raises(ValueError, match="max_norm"):
            guidance_direction(grad, 2, max_norm=bad)
    with pytest.raises(ValueError, match="num_samples"):
        guidance_direction(grad, 3)
    with pytest.raises(ValueError, match="num_samples"):
        guidance_direction(grad, 0)
    tiny = torch.full((2, 8), 1e-7, dtype=torch.float16)
    huge = torch.full((2, 8), 6e4, dtype=torch.float16)
    for value in (tiny, huge):
        direction, bad = guidance_direction(value, 2)
        assert bad == 0 and direction.dtype == torch.float16
        torch.testing.assert_close(direction.float(), torch.ones(2, 8), atol=1e-3, rtol=0)


@pytest.mark.parametrize("geometry, match", [
    ({"pts3d": [[0.0]]}, "pts3d"),
    ({"pts3d": np.zeros((1, 1, 2, 32, 32, 3))}, "pts3d"),
    ({"pts3d": torch.zeros(1, 2, 32, 32, 3, dtype=torch.long)}, "pts3d"),
    ({"pts3d": torch.zeros(1, 2, 32, 32, 3, dtype=torch.complex64)}, "pts3d"),
    ({"pts3d": torch.zeros(1, 2, 32, 32, 3), "conf": 2.0}, "conf"),
])
def test_geometry_argument_checks(geometry, match):
    with pytest.raises(ValueError, match=match):
        tiny_met3r()(_views(batch=1, num_views=2), geometry=geometry)


@pytest.mark.parametrize("kwargs, match", [
    ({"upsampler": "bogus"}, "upsampler"),
    ({"chunk_size": 1.5}, "chunk_size"),
    ({"radius": math.nan}, "radius"),
    ({"points_per_pixel": True}, "points_per_pixel"),
])
def test_constructor_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_met3r(**kwargs)


def test_constructor_flags_and_integer_likes():
    with pytest.raises(TypeError, match="use_norm"):
        tiny_met3r(use_norm="x")
    with pytest.raises(TypeError, match="freeze"):
        tiny_met3r(freeze="no")
    metric = tiny_met3r(chunk_size=np.int64(2), points_per_pixel=np.int32(10), img_size=np.int64(32))
    assert metric.chunk_size == 2 and isinstance(metric.points_per_pixel, int)
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        MEt3R.from_pretrained("/nonexistent", backbone=PlaneGeometry(), feature_backbone=TinyFeatures())


def test_functional_argument_checks():
    scores, valid = torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="empty"):
        functional.sample_scores(scores, valid, "bogus")
    with pytest.raises(ValueError, match="empty"):
        functional.fold_symmetric(scores, valid, scores, valid, "bogus")
    with pytest.raises(ValueError, match="valid"):
        functional.sample_scores(scores, valid.float())
    with pytest.raises(ValueError, match="score_map"):
        functional.pair_scores(torch.rand(2, 4, 4), torch.ones(2, 5, 4), FeatureConsistencyMetric().distance_fn)
    assert functional.estimate_focal(torch.zeros(0, 4, 4, 3)).shape == (0, 2)


@pytest.mark.parametrize("kwargs", [{"num_views": 2.5}, {"num_views": "3"}, {"kind": "grid", "grid": (1.5, 2)}])
def test_layout_settings_are_integers(kwargs):
    with pytest.raises(ValueError):
        ViewLayout(**kwargs)


@pytest.mark.parametrize("decode_size", [True, 32.0, (32, 0)])
def test_callback_decode_size_is_checked_at_construction(decode_size):
    from met3r_diffusers.callbacks import MEt3RCallback

    with pytest.raises(ValueError, match="decode_size"):
        MEt3RCallback(FeatureConsistencyMetric(), decode_size=decode_size)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ('{"intrinsics": "x"}', "intrinsics"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"intrinsics": [[[math.nan] * 3] * 3] * 2}).replace("NaN", "NaN"), "non-finite"),
])
def test_cameras_file_errors_name_the_file(tmp_path, content, match):
    from met3r_diffusers.data import MultiViewFolderDataset, make_toy_multiview_dataset

    root = make_toy_multiview_dataset(tmp_path / "data", num_scenes=1, num_views=2, resolution=32, seed=0)
    scene = next(p for p in root.iterdir() if p.is_dir())
    (scene / "cameras.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        MultiViewFolderDataset(root)


@pytest.mark.parametrize("size", [4.7, True, (4, 0)])
def test_load_image_size_is_checked(tmp_path, size):
    from PIL import Image

    from met3r_diffusers.data import load_image

    path = tmp_path / "v.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ValueError, match="size"):
        load_image(path, size=size)
    with pytest.raises(ValueError, match="num_views"):
        from met3r_diffusers.data import MultiViewFolderDataset

        MultiViewFolderDataset(tmp_path, num_views=2.5)


def test_torchmetrics_metric_min_overlap():
    evaluator = MEt3RMetric(tiny_met3r(), min_overlap=1.0)  # no pair covers every pixel: all count as empty
    evaluator.update(_views(batch=2))
    result = evaluator.compute()
    assert result["num_empty"] == 2 and math.isnan(float(result["score"]))
    with pytest.raises(ValueError, match="min_overlap"):
        MEt3RMetric(tiny_met3r(), min_overlap=math.nan)


def test_reward_inputs_are_checked():
    from met3r_diffusers.rewards import MEt3RReward, group_advantages, reward_fn

    reward = MEt3RReward(FeatureConsistencyMetric())
    views = _views(batch=2)
    for bad, match in ((views * 255, r"\[-1, 1\]"), (views[:0], "B>=1"), (views.masked_fill(views > 0.9, math.nan),
                                                                             "non-finite")):
        with pytest.raises(ValueError, match=match):
            reward(bad)
    with pytest.raises(ValueError, match="num_views"):
        reward_fn((views + 1) / 2, [], {}, reward=reward, num_views=2)
    with pytest.raises(ValueError, match="inf"):
        group_advantages(torch.tensor([1.0, math.inf]), 2)


def test_training_scripts_refuse_inf_options_and_a_file_as_output_dir(tmp_path):
    import importlib.util

    from _parity import REPO_ROOT

    spec = importlib.util.spec_from_file_location("reward_script", REPO_ROOT / "training" / "train_met3r_reward.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = ["--tiny_test_model", "--prompts_file", str(tmp_path / "p.txt"), "--num_views", "2",
            "--met3r_factory", "met3r_diffusers.testing:FeatureConsistencyMetric", "--output_dir", str(tmp_path / "o")]
    (tmp_path / "p.txt").write_text("a chair\n")
    for flag in ("--kl_weight", "--cfg_scale", "--diffusion_loss_weight"):
        with pytest.raises(ValueError, match=flag):
            script.parse_args([*base, flag, "inf"])
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="output_dir"):
        script.parse_args([*base[:-1], str(tmp_path / "afile")])
