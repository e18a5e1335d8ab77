"""MEt3R beyond the fixtures: multi-view sharing, pair modes, symmetric scores, given geometry,
distances, input validation, the accumulating evaluator. Tiny random networks, no download."""
from __future__ import annotations

import math

import pytest
import torch
from met3r_diffusers.testing import TINY_MAST3R, PlaneGeometry, TinyFeatures, plane_points, tiny_met3r
from torch import nn

from met3r_diffusers import MEt3R, MEt3REvaluator, MEt3RLoss
from met3r_diffusers.metric import geometry_from_cameras
from met3r_diffusers.models import MASt3R


def _views(batch: int = 2, num_views: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_views, 3, size, size, generator=generator) * 2 - 1


def _metric(**kwargs) -> MEt3R:
    return tiny_met3r(seed=0, **kwargs)


@pytest.fixture(scope="module")
def tiny_mast3r() -> MASt3R:
    torch.manual_seed(0)
    return MASt3R(**TINY_MAST3R).eval()


# ------------------------------------------------------------------ multi-view


def test_per_view_work_runs_once_per_view(tiny_mast3r, monkeypatch):
    calls, largest = {"encoded": 0, "decoded": 0}, []
    encode, decode = tiny_mast3r.encode_views, tiny_mast3r.decode_pair

    def counting_encode(images):
        calls["encoded"] += images.shape[0]
        return encode(images)

    def counting_decode(tokens1, *args, **kwargs):
        calls["decoded"] += tokens1.shape[0]
        largest.append(tokens1.shape[0])
        return decode(tokens1, *args, **kwargs)

    monkeypatch.setattr(tiny_mast3r, "encode_views", counting_encode)
    monkeypatch.setattr(tiny_mast3r, "decode_pair", counting_decode)
    features = TinyFeatures()
    metric = MEt3R(img_size=None, backbone=tiny_mast3r, feature_backbone=features)
    out = metric(_views(batch=2, num_views=5), pairs="adjacent")
    assert features.images_seen == 2 * 5  # V per sample, not 2 (V - 1)
    assert calls == {"encoded": 2 * 5, "decoded": 2 * 4}
    assert max(largest) == 2  # chunk_size bounds the (sample, pair) rows decoded at once, whatever B
    assert out.pair_scores.shape == (2, 4) and out.pairs == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_shared_encoder_geometry_equals_pairwise_forward(tiny_mast3r):
    views = _views(batch=2, num_views=3)
    metric = MEt3R(img_size=None, backbone=tiny_mast3r, feature_backbone=TinyFeatures())
    points, conf = metric.compute_geometry(views, [(0, 1), (2, 0)])
    for p, (i, j) in enumerate([(0, 1), (2, 0)]):
        pred1, pred2 = tiny_mast3r({"img": views[:, i]}, {"img": views[:, j]})
        torch.testing.assert_close(points[:, p, 0], pred1["pts3d"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(points[:, p, 1], pred2["pts3d_in_other_view"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(conf[:, p], torch.stack([pred1["conf"], pred2["conf"]], 1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("pairs", ["adjacent", "all", "reference", [(2, 0), (1, 3)]])
def test_multi_view_equals_scoring_each_pair_alone(pairs):
    metric = _metric()
    views = _views(batch=2, num_views=4)
    out = metric(views, pairs=pairs, return_score_map=True, return_overlap_mask=True, return_projections=True)
    assert out.score_map.shape == (2, len(out.pairs), 64, 64)
    assert out.projections.shape == (2, len(out.pairs), 2, 8, 64, 64)
    for p, (i, j) in enumerate(out.pairs):
        alone = metric(views[:, [i, j]], return_score_map=True, return_overlap_mask=True)
        torch.testing.assert_close(out.pair_scores[:, p], alone.score, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.score_map[:, p], alone.score_map, rtol=1e-5, atol=1e-6)
        assert torch.equal(out.overlap_mask[:, p], alone.overlap_mask)
    torch.testing.assert_close(out.score, out.pair_scores.mean(1))
    assert (out.overlap_fraction > 0.05).all()


def test_unused_views_are_not_processed():
    metric = _metric()
    views = _views(batch=2, num_views=6)
    out = metric(views, pairs=[(4, 1)])
    assert metric.feature_backbone.images_seen == 2 * 2
    torch.testing.assert_close(out.score, metric(views[:, [4, 1]]).score)


def test_chunking_does_not_change_results():
    views = _views(batch=2, num_views=4)
    full = _metric(chunk_size=None)(views, pairs="all", return_score_map=True)
    chunked = _metric(chunk_size=1)(views, pairs="all", return_score_map=True)
    torch.testing.assert_close(chunked.pair_scores, full.pair_scores)
    torch.testing.assert_close(chunked.score_map, full.score_map)


def test_symmetric_averages_both_directions():
    views = _views(batch=2, num_views=2)
    metric = _metric()
    forward = metric(views).score
    backward = metric(views.flip(1)).score
    symmetric = _metric(symmetric=True)(views).score
    torch.testing.assert_close(symmetric, (forward + backward) / 2)
    assert not torch.allclose(forward, backward)


def test_inference_mode_without_gradient_and_grad_with_it(monkeypatch):
    metric = _metric()
    views = _views(batch=1, num_views=2)
    seen = []
    features = metric.compute_features
    monkeypatch.setattr(metric, "compute_features", lambda images: seen.append(torch.is_inference_mode_enabled()) or features(images))
    out = metric(views, return_score_map=True)
    assert seen == [True]
    # what the caller gets is an ordinary tensor: usable in autograd and editable in place
    assert not out.score.is_inference() and not out.score_map.is_inference()
    weight = torch.ones(1, requires_grad=True)
    (weight * out.score).sum().backward()
    out.score_map[out.score_map > 1] = 1
    views.requires_grad_(True)
    out = metric(views)
    assert not out.score.is_inference()
    out.score.sum().backward()
    assert views.grad.abs().sum() > 0 and torch.isfinite(views.grad).all()


def test_empty_overlap_pair_is_nan_with_zero_gradient_and_ignored_in_the_mean():
    metric = _metric()
    views = _views(batch=1, num_views=3)
    geometry = _plane_pairs(views, 2)
    geometry["pts3d"][:, 1, 1, ..., 2] = -1.0  # pair 1's second cloud behind the camera
    views.requires_grad_(True)
    out = metric(views, pairs=[(0, 1), (1, 2)], geometry=geometry)
    assert not math.isnan(out.pair_scores[0, 0]) and math.isnan(out.pair_scores[0, 1])
    assert out.overlap_fraction[0, 1] == 0 and out.score[0] == out.pair_scores[0, 0]
    out.score.sum().backward()
    assert torch.isfinite(views.grad).all()


def test_all_pairs_empty_gives_nan_score():
    metric = _metric()
    views = _views(batch=1, num_views=2)
    geometry = _plane_pairs(views, 1)
    geometry["pts3d"][..., 2] = -1.0
    out = metric(views, geometry=geometry)
    assert math.isnan(out.score[0]) and out.overlap_fraction[0, 0] == 0


# ------------------------------------------------------------------ given geometry


def _plane_pairs(views: torch.Tensor, num_pairs: int) -> dict[str, torch.Tensor]:
    batch, _, _, height, width = views.shape
    points = plane_points(batch, height, width)[:, None, None].repeat(1, num_pairs, 2, 1, 1, 1)
    return {"pts3d": points, "conf": torch.full((batch, num_pairs, 2, height, width), 2.0)}


def test_given_geometry_replaces_the_backbone():
    views = _views(batch=2, num_views=2)
    metric = _metric()
    from_backbone = metric(views)
    preds = PlaneGeometry()({"img": views[:, 0]}, {"img": views[:, 1]})
    geometry = {
        "pts3d": torch.stack([preds[0]["pts3d"], preds[1]["pts3d_in_other_view"]], 1),
        "conf": torch.stack([preds[0]["conf"], preds[1]["conf"]], 1),
    }
    given = _metric(backbone=nn.Identity())(views, geometry=geometry)
    torch.testing.assert_close(given.score, from_backbone.score)


def test_geometry_from_cameras_puts_points_in_view_i_frame():
    views = _views(batch=1, num_views=3)
    batch, num_views, _, height, width = views.shape
    camera_points = plane_points(1, height, width)[0]
    world_to_camera = torch.eye(4).repeat(batch, num_views, 1, 1)
    world_to_camera[:, 1, 0, 3] = 0.1  # camera 1 is 0.1 to the left of camera 0
    world_points = camera_points - world_to_camera[:, :, None, None, :3, 3]  # (B, V, H, W, 3)
    geometry = geometry_from_cameras(world_points, world_to_camera, pairs=[(1, 0), (0, 2)])
    assert geometry["pts3d"].shape == (1, 2, 2, height, width, 3)
    torch.testing.assert_close(geometry["pts3d"][:, 0, 0], camera_points.expand(1, -1, -1, -1))
    torch.testing.assert_close(geometry["pts3d"][:, 0, 1], world_points[:, 0] + world_to_camera[:, 1, None, None, :3, 3])
    out = _metric(backbone=nn.Identity())(views, pairs=[(1, 0), (0, 2)], geometry=geometry)
    assert (out.overlap_fraction > 0).all()
    with pytest.raises(ValueError, match="world_to_camera"):
        geometry_from_cameras(world_points, torch.eye(3).repeat(1, 3, 1, 1), pairs=[(0, 1)])


def test_bad_geometry_raises():
    views = _views(batch=1, num_views=2)
    metric = _metric()
    with pytest.raises(ValueError, match=r'geometry\["pts3d"\]'):
        metric(views, geometry={"pts3d": torch.zeros(1, 2, 32, 32, 3)})
    with pytest.raises(ValueError, match="dict"):
        metric(views, geometry=torch.zeros(1))


# ------------------------------------------------------------------ distances


@pytest.mark.parametrize("distance", ["mse", "rmse", "psnr"])
def test_rgb_distances(distance):
    views = _views(batch=1, num_views=2)
    metric = _metric(distance=distance)
    assert metric.feature_backbone is None  # no feature network is built or downloaded
    out = metric(views, return_score_map=True, return_overlap_mask=True)
    identical = metric(views[:, [0, 0]], return_score_map=True, return_overlap_mask=True)
    mask = out.overlap_mask > 0
    if distance == "psnr":
        assert identical.score[0] == pytest.approx(100.0)  # the 1e-10 MSE floor
        assert 0 < out.score[0] < 100 and out.score[0] < identical.score[0]
    else:
        assert identical.score[0] == pytest.approx(0.0, abs=1e-5)
        assert out.score[0] > 0.05
    if distance != "psnr":  # rendered RGB in [0, 1]: per-pixel (root) mean squared differences are at most 1
        assert 0 <= float(out.score_map[mask].min()) and float(out.score_map[mask].max()) <= 1


def test_ssim_distance():
    pytest.importorskip("torchmetrics")
    views = _views(batch=1, num_views=2)
    metric = _metric(distance="ssim")
    same = metric(views[:, [0, 0]])
    assert same.score[0] == pytest.approx(1.0, abs=1e-4)  # SSIM: higher = more similar
    assert float(metric(views).score[0]) < 0.9


def test_unknown_or_missing_distance_raises():
    with pytest.raises(ValueError, match="distance must be one of"):
        _metric(distance="l1")
    try:  # lpips needs torchvision, which this project does not install
        import lpips  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lpips"):
            _metric(distance="lpips")


# ------------------------------------------------------------------ construction and validation


def test_constructor_errors():
    with pytest.raises(ValueError, match="img_size"):
        MEt3R(img_size=0, backbone=PlaneGeometry(), feature_backbone=TinyFeatures())
    with pytest.raises(ValueError, match="backbone must be one of"):
        MEt3R(backbone="vggt", feature_backbone=TinyFeatures())
    with pytest.raises(ValueError, match="feature_backbone must be one of"):
        MEt3R(backbone=PlaneGeometry(), feature_backbone="clip")
    with pytest.raises(ValueError, match="reference"):
        _metric(reference="v2")
    with pytest.raises(TypeError, match="unexpected keyword"):
        _metric(use_featup=False)


def test_freeze_keeps_eval_mode_and_no_grad():
    metric = _metric()
    metric.train()
    assert not metric.training and not metric.feature_backbone.training
    assert not any(p.requires_grad for p in metric.parameters())
    trainable = _metric(freeze=False)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(2, 3, 64, 64), r"\(B, V, 3, H, W\)"),
        (torch.zeros(1, 1, 3, 64, 64), "V >= 2"),
        (torch.zeros(1, 2, 3, 64, 56), "multiples of 16"),
        (torch.full((1, 2, 3, 64, 64), 1.5), r"\[-1, 1\]"),
        (torch.full((1, 2, 3, 64, 64), math.nan), "non-finite"),
        (torch.zeros(1, 2, 3, 64, 64, dtype=torch.int64), "floating-point"),
        (torch.zeros(1, 2, 3, 64, 64, dtype=torch.float64), "float64"),
    ],
)
def test_bad_images_raise(images, match):
    with pytest.raises(ValueError, match=match):
        _metric()(images)


def test_device_and_dtype_mismatch_raise():
    metric = _metric()
    with pytest.raises(ValueError, match="metric is on cpu"):
        metric(torch.zeros(1, 2, 3, 64, 64, device="meta"))
    low_precision = _metric().to(torch.bfloat16)
    with pytest.raises(ValueError, match="autocast"):
        low_precision(_views(batch=1, num_views=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(low_precision(_views(batch=1, num_views=2)).score).all()


def test_bf16_autocast_keeps_features_rendering_and_score_in_float32():
    metric, views = _metric(), _views(batch=1, num_views=3)
    reference = metric(views)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert metric.feature_backbone(views[:, 0]).dtype == torch.bfloat16
        assert metric.compute_features(views).dtype == torch.float32
        low = metric(views)
    assert low.pair_scores.dtype == torch.float32
    torch.testing.assert_close(low.pair_scores, reference.pair_scores, atol=2e-2, rtol=0)


def test_bf16_weights_under_autocast_stay_close_to_float32():
    """metric.to(torch.bfloat16) under autocast, as the CLI's --bf16 runs it."""
    metric, views = _metric(), _views(batch=1, num_views=3)
    reference = metric(views)
    metric.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = metric(views)
    assert low.pair_scores.dtype == torch.float32 and torch.isfinite(low.pair_scores).all()
    torch.testing.assert_close(low.pair_scores, reference.pair_scores, atol=3e-2, rtol=0)


def test_cosine_distance_keeps_full_precision_under_autocast():
    from met3r_diffusers.distances import cosine_distance

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 64, 8, 8, generator=generator) for _ in range(2))
    exact = 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(cosine_distance(a, b), exact, rtol=0, atol=1e-6)


def test_bad_pairs_raise():
    with pytest.raises(ValueError, match="out of range"):
        _metric()(_views(num_views=3), pairs=[(0, 3)])
    with pytest.raises(ValueError, match="pairs must be one of"):
        _metric()(_views(num_views=3), pairs="ring")


def test_slight_overshoot_is_accepted():
    views = _views(batch=1, num_views=2).clamp(-1, 1) * 1.0005
    assert torch.isfinite(_metric()(views).score).all()


# ------------------------------------------------------------------ evaluator and loss


def test_evaluator_accumulates_like_one_big_batch():
    metric = _metric()
    views = _views(batch=4, num_views=3)
    evaluator = MEt3REvaluator(metric, pairs="all")
    evaluator.update(views[:1])
    evaluator.update(views[1:])
    result = evaluator.compute()
    whole = metric(views, pairs="all")
    torch.testing.assert_close(result["score"], whole.score.mean())
    torch.testing.assert_close(result["pair_scores"], whole.pair_scores.mean(0))
    assert result["num_samples"] == 4 and result["num_empty"] == 0
    evaluator.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        evaluator.compute()


def _evaluate_shard(rank: int, world_size: int, init_file: str, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        views = _views(batch=5, num_views=3)
        evaluator = MEt3REvaluator(_metric(), pairs="adjacent")
        shard = views[rank::world_size]  # 3 samples on rank 0, 2 on rank 1
        evaluator.update(shard)
        results[rank] = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in evaluator.compute().items()}
    finally:
        torch.distributed.destroy_process_group()


def test_evaluator_syncs_across_processes(tmp_path):
    manager = torch.multiprocessing.Manager()
    results = manager.dict()
    torch.multiprocessing.spawn(_evaluate_shard, args=(2, str(tmp_path / "init"), results), nprocs=2)
    single = MEt3REvaluator(_metric(), pairs="adjacent")
    single.update(_views(batch=5, num_views=3))
    expected = single.compute()
    for rank in (0, 1):
        assert results[rank]["num_samples"] == 5
        assert results[rank]["score"] == pytest.approx(float(expected["score"]), abs=1e-6)
        assert results[rank]["pair_scores"] == pytest.approx(expected["pair_scores"].tolist(), abs=1e-6)


def test_loss_on_the_real_metric_has_gradients():
    loss_fn = MEt3RLoss(_metric(), pairs="adjacent")
    views = _views(batch=2, num_views=3).requires_grad_(True)
    loss = loss_fn(views)
    loss.backward()
    assert loss.ndim == 0 and 0 < float(loss) < 2
    assert torch.isfinite(views.grad).all() and views.grad.abs().sum() > 0


def test_cosine_distance_gradient_matches_autograd_and_gradcheck():
    """The fused backward of the cosine distance equals autograd's chain (zero vectors included)."""
    from met3r_diffusers.distances import cosine_distance

    def chain(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        dot = torch.einsum("nchw,nchw->nhw", b, a)
        return 1 - dot / (torch.linalg.norm(b, dim=1) * torch.linalg.norm(a, dim=1) + eps)

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=generator)
    b = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(cosine_distance, (a.clone().requires_grad_(), b.clone().requires_grad_()))
    a[0, :, 0, 0] = 0  # an empty pixel of a rendering
    a.requires_grad_(), b.requires_grad_()
    weights = torch.randn(2, 3, 4, dtype=torch.float64, generator=generator)
    assert torch.equal(cosine_distance(a, b), chain(a, b))
    ours = torch.autograd.grad((cosine_distance(a, b) * weights).sum(), (a, b))
    theirs = torch.autograd.grad((chain(a, b) * weights).sum(), (a, b))
    assert all((x - y).abs().max().item() <= 1e-12 for x, y in zip(ours, theirs))
    # broadcast operands keep working (one image against a batch)
    assert cosine_distance(a[:1].detach(), b.detach()).shape == (2, 3, 4)
