"""MEt3RLoss: reductions, pair subsampling, timestep gating, empty overlaps, chunking, frozen metric, decoding."""
from __future__ import annotations

import pytest
import torch

from met3r_diffusers import MEt3RLoss
from met3r_diffusers.loss import decode_views, predict_x0


from met3r_diffusers.testing import FeatureConsistencyMetric


def _views(batch=2, num_views=4, size=16, seed=0):
    return (torch.rand(batch, num_views, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1)


def test_mean_equals_metric_pair_scores_and_is_differentiable():
    metric = FeatureConsistencyMetric(shift=2)
    views = _views().requires_grad_(True)
    loss = MEt3RLoss(metric, pairs="all")(views)
    expected = metric(views.detach(), pairs="all").pair_scores.mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(views.grad).all() and views.grad.abs().sum() > 0


def test_reductions():
    metric = FeatureConsistencyMetric()
    views = _views(batch=3)
    pair_scores = metric(views, pairs="adjacent").pair_scores  # (3, 3)
    torch.testing.assert_close(MEt3RLoss(metric, reduction="sum")(views), pair_scores.sum())
    torch.testing.assert_close(MEt3RLoss(metric, reduction="none")(views), pair_scores.mean(1))
    with pytest.raises(ValueError, match="reduction"):
        MEt3RLoss(metric, reduction="max")


def test_empty_overlap_pairs_contribute_nothing_and_no_nan_gradient():
    metric = FeatureConsistencyMetric(empty_pairs=[(1, 2)])
    views = _views().requires_grad_(True)
    raw = metric(views, pairs="adjacent").pair_scores
    assert torch.isnan(raw[:, 1]).all()  # the metric itself reports NaN for the empty pair
    # ... and its plain NaN-masked mean poisons the gradient
    torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw)).sum().backward()
    assert torch.isnan(views.grad).any()

    views.grad = None
    loss = MEt3RLoss(metric)(views)
    torch.testing.assert_close(loss.detach(), raw.detach()[:, [0, 2]].mean())
    loss.backward()
    assert torch.isfinite(views.grad).all()
    assert views.grad[:, 1:3].abs().sum() > 0  # views 1 and 2 still get gradient from pairs (0,1) and (2,3)


def test_nothing_contributes_gives_a_connected_zero():
    metric = FeatureConsistencyMetric(empty_pairs=[(0, 1)])
    views = _views(num_views=2).requires_grad_(True)
    loss = MEt3RLoss(metric)(views)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(views.grad, torch.zeros_like(views))


def test_timestep_gate():
    metric = FeatureConsistencyMetric()
    views = _views(batch=3)
    per_sample = metric(views).pair_scores.mean(1)
    loss_fn = MEt3RLoss(metric, max_timestep=400)
    torch.testing.assert_close(loss_fn(views, timesteps=torch.tensor([100, 900, 400])), per_sample[[0, 2]].mean())
    gated = MEt3RLoss(metric, max_timestep=400, reduction="none")(views, timesteps=torch.tensor([100, 900, 400]))
    torch.testing.assert_close(gated, per_sample * torch.tensor([1.0, 0.0, 1.0]))
    views.requires_grad_(True)
    zero = loss_fn(views, timesteps=999)
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="timesteps"):
        loss_fn(views)
    with pytest.raises(ValueError, match="one value per sample"):
        loss_fn(views, timesteps=torch.tensor([1, 2]))


def test_random_pair_subsampling_is_seeded():
    metric = FeatureConsistencyMetric()
    views = _views(num_views=5)
    all_pairs = metric(views, pairs="all").pair_scores  # 10 pairs
    loss_fn = MEt3RLoss(metric, pairs="all", num_pairs=3, generator=torch.Generator().manual_seed(7))
    chosen = MEt3RLoss(metric, pairs="all", num_pairs=3, generator=torch.Generator().manual_seed(7)).select_pairs(5)
    assert len(chosen) == 3 and len(set(chosen)) == 3
    index = [[(i, j) for i in range(5) for j in range(i + 1, 5)].index(pair) for pair in chosen]
    torch.testing.assert_close(loss_fn(views), all_pairs[:, index].mean())
    assert len({tuple(loss_fn.select_pairs(5)) for _ in range(5)}) > 1  # later calls draw new subsets
    assert MEt3RLoss(metric, num_pairs=10).select_pairs(4) == [(0, 1), (1, 2), (2, 3)]


def test_chunking_matches_one_call():
    metric = FeatureConsistencyMetric(shift=1)
    views = _views(batch=5)
    torch.testing.assert_close(MEt3RLoss(metric, chunk_size=2)(views), MEt3RLoss(metric)(views))


def test_metric_is_frozen_and_stays_in_eval_mode():
    metric = FeatureConsistencyMetric().requires_grad_(True).train()
    loss_fn = MEt3RLoss(metric).train()
    assert not metric.training and not any(p.requires_grad for p in metric.parameters())
    loss_fn(_views().requires_grad_(True)).backward()
    assert all(p.grad is None for p in metric.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_pairs": 0}, "num_pairs"), ({"max_timestep": -1}, "max_timestep"), ({"chunk_size": 0}, "chunk_size")],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MEt3RLoss(FeatureConsistencyMetric(), **kwargs)
    with pytest.raises(TypeError, match="callable"):
        MEt3RLoss("met3r")
    with pytest.raises(ValueError, match="views"):
        MEt3RLoss(FeatureConsistencyMetric())(torch.zeros(2, 3, 16, 16))


def test_decode_views_with_gradient_checkpointing():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
    )
    latents = torch.randn(6, 4, 8, 8, requires_grad=True)
    views = decode_views(vae, latents, num_views=3)
    assert views.shape == (2, 3, 3, 16, 16)
    views.square().sum().backward()
    grad = latents.grad.clone()
    latents.grad = None
    checkpointed = decode_views(vae, latents, num_views=3, gradient_checkpointing=True)
    torch.testing.assert_close(checkpointed, views)
    checkpointed.square().sum().backward()
    torch.testing.assert_close(latents.grad, grad)
    assert decode_views(vae, latents, num_views=3, size=8).shape == (2, 3, 3, 8, 8)
    with pytest.raises(ValueError, match="num_views"):
        decode_views(vae, latents, num_views=4)
    assert callable(predict_x0)
