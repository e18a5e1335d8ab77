"""The functional core: stage functions, empty="nan" | "zero", `valid`; MEt3RConfig / from_config / from_pretrained."""
from __future__ import annotations

import math

import pytest
import torch

from met3r_diffusers import MEt3R, MEt3RConfig, MEt3RLoss
from met3r_diffusers import functional
from met3r_diffusers.distances import get_distance
from met3r_diffusers.testing import FeatureConsistencyMetric, PlaneGeometry, TinyFeatures, plane_points, tiny_met3r


def _views(batch=2, num_views=3, size=32, seed=0):
    return torch.rand(batch, num_views, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pair_scores_empty_modes_and_valid():
    score_map = torch.rand(3, 4, 4)
    mask = torch.zeros(3, 4, 4)
    mask[0] = 1
    mask[1, :2] = 1
    score_map[2] = math.nan  # nothing compared there: must not leak
    cosine = get_distance("cosine")
    nan_scores, valid = functional.pair_scores(score_map, mask, cosine, eps=1e-6, empty="nan")
    zero_scores, zero_valid = functional.pair_scores(score_map, mask, cosine, eps=1e-6, empty="zero")
    assert valid.tolist() == [True, True, False] and torch.equal(valid, zero_valid)
    expected = torch.stack([score_map[0].sum() / (16 + 1e-6), score_map[1, :2].sum() / (8 + 1e-6)])
    torch.testing.assert_close(nan_scores[:2], expected)
    torch.testing.assert_close(zero_scores[:2], expected)
    assert math.isnan(nan_scores[2]) and zero_scores[2] == 0
    with pytest.raises(ValueError, match="empty"):
        functional.pair_scores(score_map, mask, cosine, empty="skip")


def test_psnr_reduction_lives_in_the_distance():
    psnr = get_distance("psnr")
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)
    scores, _ = functional.pair_scores(psnr(a, b), torch.ones(1, 4, 4), psnr)
    torch.testing.assert_close(scores, torch.tensor([20.0]), atol=1e-3, rtol=0)  # MSE 0.01 -> 20 dB
    assert psnr.higher_is_better and not psnr.on_features and get_distance("cosine").on_features


def test_sample_scores_and_symmetric_fold():
    scores = torch.tensor([[0.2, 0.4], [0.3, 0.0]])
    valid = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(functional.sample_scores(scores, valid), torch.tensor([0.3, 0.3]))
    none = torch.zeros(1, 2, dtype=torch.bool)
    assert math.isnan(functional.sample_scores(scores[:1], none)) and functional.sample_scores(scores[:1], none, "zero") == 0
    folded, either = functional.fold_symmetric(
        torch.tensor([0.2, 0.4, 0.0]), torch.tensor([True, True, False]),
        torch.tensor([0.4, 0.0, 0.0]), torch.tensor([True, False, False]), "nan",
    )
    torch.testing.assert_close(folded[:2], torch.tensor([0.3, 0.4]))
    assert math.isnan(folded[2]) and either.tolist() == [True, True, False]


def test_metric_empty_zero_equals_nan_mode_where_valid_and_reports_valid():
    metric = tiny_met3r()
    views = _views()
    points = plane_points(8, 32, 32).reshape(2, 2, 2, 32, 32, 3)
    points[:, 0, ..., 2] = -2.0  # pair (0, 1): behind the camera, nothing renders
    geometry = {"pts3d": points, "conf": torch.full((2, 2, 2, 32, 32), 2.0)}
    nan_out = metric(views, pairs="adjacent", geometry=geometry)
    zero_out = metric(views, pairs="adjacent", geometry=geometry, empty="zero")
    assert nan_out.valid.tolist() == [[False, True], [False, True]]
    assert torch.isnan(nan_out.pair_scores[:, 0]).all() and (zero_out.pair_scores[:, 0] == 0).all()
    torch.testing.assert_close(nan_out.pair_scores[:, 1], zero_out.pair_scores[:, 1])
    torch.testing.assert_close(nan_out.score, zero_out.score)  # the mean over valid pairs either way


def test_loss_reuses_the_metric_score_exactly():
    metric = tiny_met3r()
    views = _views()
    loss = MEt3RLoss(metric, reduction="none")(views)
    torch.testing.assert_close(loss, metric(views, pairs="adjacent").score, rtol=0, atol=0)


def test_config_round_trip_and_from_pretrained(tmp_path):
    metric = tiny_met3r(symmetric=True, radius=0.02, chunk_size=3)
    assert metric.config.symmetric and metric.config.radius == 0.02 and metric.config.backbone == "custom"
    with pytest.raises(ValueError, match="backbone"):
        MEt3R.from_config(metric.config)
    rebuilt = MEt3R.from_config(metric.config, backbone=PlaneGeometry(), feature_backbone=TinyFeatures())
    views = _views(batch=1)
    torch.testing.assert_close(rebuilt(views).score, metric(views).score)
    config = MEt3RConfig(img_size=None, distance="mse")
    assert MEt3R.from_config(config, backbone=PlaneGeometry()).distance == "mse"
    with pytest.raises(TypeError, match="MEt3RConfig"):
        MEt3R.from_config({"img_size": 32})
    pretrained = MEt3R.from_pretrained(
        img_size=None, backbone=PlaneGeometry(), feature_backbone=TinyFeatures(), torch_dtype=torch.float64,
        device="cpu",
    )
    assert pretrained.dtype == torch.float64 and pretrained.device == torch.device("cpu")
    with pytest.raises(ValueError, match="torch_dtype"):
        MEt3R.from_pretrained(backbone=PlaneGeometry(), feature_backbone=TinyFeatures(), torch_dtype=torch.int8)
    weightless = MEt3R(img_size=None, backbone=PlaneGeometry(), distance="mse")
    assert weightless.dtype == torch.float32 and weightless.device == torch.device("cpu")


def test_bf16_metric_takes_float32_views_through_the_loss():
    metric = tiny_met3r().to(torch.bfloat16)
    views = _views(batch=1).requires_grad_(True)
    with pytest.raises(ValueError, match="bfloat16"):
        metric(views)
    loss = MEt3RLoss(metric)(views)
    loss.backward()
    assert torch.isfinite(loss) and views.grad.dtype == torch.float32 and views.grad.abs().sum() > 0


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_loss_settings_must_be_finite(value):
    with pytest.raises(ValueError, match="max_timestep"):
        MEt3RLoss(FeatureConsistencyMetric(), max_timestep=value)


@pytest.mark.parametrize("num_pairs", [1.5, 0, True, "2"])
def test_loss_num_pairs_must_be_a_positive_int(num_pairs):
    with pytest.raises(ValueError, match="num_pairs"):
        MEt3RLoss(FeatureConsistencyMetric(), num_pairs=num_pairs)


def test_loss_warns_and_reports_when_nothing_overlaps(caplog):
    loss_fn = MEt3RLoss(FeatureConsistencyMetric(empty_pairs=[(0, 1), (1, 2)]))
    with caplog.at_level("WARNING", logger="met3r_diffusers"):
        for _ in range(3):
            assert float(loss_fn(_views())) == 0
    assert loss_fn.last_contributing_fraction == 0
    assert sum("no scored pair overlapped" in r.message for r in caplog.records) == 1  # rate-limited
    loss_fn = MEt3RLoss(FeatureConsistencyMetric(empty_pairs=[(0, 1)]))
    loss_fn(_views())
    assert loss_fn.last_contributing_fraction == 0.5


def test_loss_refuses_nan_scores_without_valid_flags():
    from types import SimpleNamespace

    def nan_metric(views, pairs=None):
        return SimpleNamespace(score=torch.full((views.shape[0],), math.nan),
                               pair_scores=torch.full((views.shape[0], 2), math.nan))

    with pytest.raises(ValueError, match="valid"):
        MEt3RLoss(nan_metric)(_views())


def test_bf16_views_give_a_float32_loss():
    loss = MEt3RLoss(FeatureConsistencyMetric().to(torch.bfloat16))(_views().to(torch.bfloat16))
    assert loss.dtype == torch.float32


def test_bf16_metric_with_an_rgb_distance_keeps_float32_pixels():
    from met3r_diffusers.loss import call_metric

    metric = MEt3R(img_size=None, backbone=PlaneGeometry(), distance="psnr")
    views = _views(batch=1)
    reference = metric(views).score
    metric.dtype_probe = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16), requires_grad=False)
    assert metric.dtype == torch.bfloat16
    torch.testing.assert_close(call_metric(metric, views, None).score, reference)  # autocast, not a bf16 cast
