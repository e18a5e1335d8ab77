"""MEt3RReward, group_advantages, reward_fn and image_statistics on the toy stand-in metrics (CPU, no weights)."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from met3r_diffusers.rewards import MEt3RReward, group_advantages, image_statistics, reward_fn
from met3r_diffusers.testing import FeatureConsistencyMetric, tiny_met3r


def _views(batch=3, num_views=3, size=16, seed=0):
    return torch.rand(batch, num_views, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_rewards_are_minus_the_metric_score_with_info():
    metric = FeatureConsistencyMetric(shift=1)
    views = _views()
    rewards, info = MEt3RReward(metric, pairs="all")(views)
    expected = metric(views, pairs="all")
    assert rewards.shape == (3,) and not rewards.requires_grad
    torch.testing.assert_close(rewards, -expected.score)
    assert info["pairs"] == [(0, 1), (0, 2), (1, 2)]
    assert info["pair_scores"].shape == info["valid"].shape == info["overlap"].shape == (3, 3)
    torch.testing.assert_close(info["pair_scores"], expected.pair_scores)
    torch.testing.assert_close(info["overlap"], expected.overlap_fraction)
    assert info["num_empty_pairs"] == 0 and info["num_empty_samples"] == 0 and bool(info["valid_samples"].all())


def test_consistent_views_get_a_higher_reward():
    """Signs: identical views (shift 0: perfectly consistent) score 0 and get reward 0 > reward of random views."""
    reward = MEt3RReward(FeatureConsistencyMetric(shift=0))
    consistent = _views(batch=2, num_views=1).expand(-1, 3, -1, -1, -1)
    random_rewards, _ = reward(_views(batch=2))
    consistent_rewards, _ = reward(consistent)
    torch.testing.assert_close(consistent_rewards, torch.zeros(2), atol=1e-5, rtol=0)
    assert bool((random_rewards < -0.05).all())


def test_pairs_without_overlap_contribute_nothing():
    views = _views()
    full = FeatureConsistencyMetric(shift=1)(views, pairs="adjacent")
    rewards, info = MEt3RReward(FeatureConsistencyMetric(shift=1, empty_pairs=[(0, 1)]))(views)
    torch.testing.assert_close(rewards, -full.pair_scores[:, 1])  # only pair (1, 2) counts
    assert info["num_empty_pairs"] == 3 and info["num_empty_samples"] == 0
    assert bool(info["pair_scores"][:, 0].isnan().all()) and not bool(info["valid"][:, 0].any())


@pytest.mark.parametrize("nan_reward, expected", [(None, math.nan), (-1.0, -1.0)])
def test_samples_without_any_overlap_get_nan_reward(nan_reward, expected):
    metric = FeatureConsistencyMetric(shift=1, empty_pairs=[(0, 1), (1, 2)])
    rewards, info = MEt3RReward(metric, nan_reward=nan_reward)(_views())
    torch.testing.assert_close(rewards, torch.full((3,), expected), equal_nan=True)
    assert info["num_empty_samples"] == 3 and bool(info["score"].isnan().all())


@pytest.mark.parametrize("empty_pairs", [[(0, 1)], [(0, 1), (1, 2)]])
def test_differentiable_reward_has_finite_gradients_without_overlap(empty_pairs):
    """The stand-in's own masked mean has a NaN gradient for empty pairs; the reward's gradient stays finite."""
    views = _views().requires_grad_()
    reward = MEt3RReward(FeatureConsistencyMetric(shift=1, empty_pairs=empty_pairs), differentiable=True)
    rewards, info = reward(views)
    assert rewards.requires_grad
    valid = info["valid_samples"]
    torch.where(valid, rewards, torch.zeros_like(rewards)).sum().backward()
    assert torch.isfinite(views.grad).all()
    assert (views.grad.abs().sum() > 0) == (len(empty_pairs) == 1)


def test_reward_gradient_points_to_more_consistent_views():
    """A small step along the reward's gradient increases the reward."""
    views = _views(batch=2).requires_grad_()
    reward = MEt3RReward(FeatureConsistencyMetric(shift=1), differentiable=True)
    rewards, _ = reward(views)
    rewards.sum().backward()
    stepped, _ = reward((views + 0.05 * views.grad / views.grad.abs().max()).detach())
    assert bool((stepped > rewards.detach()).all())


def test_chunked_equals_unchunked_and_real_metric_class():
    metric = tiny_met3r(seed=0)
    views = _views(batch=3, size=32)
    whole, info = MEt3RReward(metric)(views)
    chunked, chunked_info = MEt3RReward(metric, chunk_size=2)(views)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(chunked_info["pair_scores"], info["pair_scores"])
    torch.testing.assert_close(whole, -metric(views, pairs="adjacent").score)
    assert bool(torch.isfinite(whole).all())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"nan_reward": math.nan}, "nan_reward"), ({"chunk_size": 0}, "chunk_size"), ({"pairs": "every"}, "pairs")],
)
def test_bad_reward_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MEt3RReward(FeatureConsistencyMetric(), **kwargs)


def test_bad_views_shape():
    with pytest.raises(ValueError, match="views must be"):
        MEt3RReward(FeatureConsistencyMetric())(torch.zeros(2, 3, 16, 16))


# ----------------------------------------------------------------------------- group advantages


def test_group_advantages_normalise_within_groups():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    advantages = group_advantages(rewards, group_size=3)
    groups = advantages.reshape(2, 3)
    torch.testing.assert_close(groups.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(groups.std(1, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(groups[0], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5), atol=1e-5, rtol=0)
    assert advantages[5] > 0 > advantages[3] == advantages[4]  # signs follow the reward within its group
    assert advantages.dtype == rewards.dtype and advantages.shape == (6,)


def test_group_advantages_nan_and_degenerate_groups():
    nan = math.nan
    rewards = torch.tensor([1.0, nan, 3.0, 5.0, 5.0, 5.0, nan, 2.0, nan])
    advantages = group_advantages(rewards, group_size=3)
    assert bool(torch.isfinite(advantages).all())
    # NaN: advantage 0 and left out of the statistics (group 0 normalises over 1 and 3 only)
    torch.testing.assert_close(advantages[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(advantages[3:], torch.zeros(6))  # constant group; single finite reward


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), group_size=0)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        group_advantages(torch.zeros(2, 2), group_size=2)


# ----------------------------------------------------------------------------- reward_fn


def test_reward_fn_flat_images_one_reward_per_image():
    metric = FeatureConsistencyMetric(shift=1)
    views = _views(batch=2)  # in [-1, 1]
    images = ((views + 1) / 2).flatten(0, 1)  # (6, 3, H, W) in [0, 1], the pipelines' "pt" output
    score_fn = functools.partial(reward_fn, reward=MEt3RReward(metric), num_views=3)
    rewards, info = score_fn(images, ["a prompt"] * 6, {})
    expected = -metric(views).score
    assert rewards.shape == (6,)
    torch.testing.assert_close(rewards, expected.repeat_interleave(3))
    assert info["pair_scores"].shape == (2, 2)
    # metadata carries num_views when it is not bound
    from_metadata, _ = reward_fn(images, ["p"] * 6, {"num_views": 3}, reward=MEt3RReward(metric))
    torch.testing.assert_close(from_metadata, rewards)


def test_reward_fn_uint8_pil_and_views():
    from PIL import Image

    metric = FeatureConsistencyMetric(shift=1)
    reward = MEt3RReward(metric)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    from_uint8, _ = reward_fn(pixels, [""] * 4, None, reward=reward, num_views=2)
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    from_pil, _ = reward_fn(pil, [""] * 4, None, reward=reward, num_views=2)
    from_array, _ = reward_fn(pixels.permute(0, 2, 3, 1).numpy(), [""] * 4, None, reward=reward, num_views=2)
    views = pixels.float().reshape(2, 2, 3, 16, 16) / 255
    from_views, _ = reward_fn(views, [""] * 2, None, reward=reward)
    torch.testing.assert_close(from_pil, from_uint8)
    torch.testing.assert_close(from_array, from_uint8)
    torch.testing.assert_close(from_views.repeat_interleave(2), from_uint8, rtol=1e-5, atol=1e-6)
    assert np.isfinite(from_uint8.numpy()).all()


def test_reward_fn_errors():
    reward = MEt3RReward(FeatureConsistencyMetric())
    with pytest.raises(ValueError, match="num_views"):
        reward_fn(torch.rand(4, 3, 16, 16), [""] * 4, {}, reward=reward)
    with pytest.raises(ValueError, match="num_views 3 does not divide"):
        reward_fn(torch.rand(4, 3, 16, 16), [""] * 4, {}, reward=reward, num_views=3)
    with pytest.raises(TypeError, match="reward must be a MEt3RReward"):
        reward_fn(torch.rand(4, 3, 16, 16), [""] * 4, {}, reward=FeatureConsistencyMetric(), num_views=2)


def test_minimal_grpo_style_step():
    """The documented loop: group advantages of MEt3R rewards weight the log-probabilities of G samples a prompt."""
    group, num_views = 4, 2
    metric = FeatureConsistencyMetric(shift=1)
    score_fn = functools.partial(reward_fn, reward=MEt3RReward(metric, nan_reward=-1.0), num_views=num_views)
    images = torch.rand(group * num_views, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    log_probs = torch.zeros(group * num_views, requires_grad=True)
    rewards, _ = score_fn(images, ["a prompt"] * len(images), {})
    advantages = group_advantages(rewards[::num_views], group_size=group)
    loss = -(advantages.repeat_interleave(num_views) * log_probs).mean()
    loss.backward()
    # gradient ascent on log-probs favours the samples with above-average reward
    best = int(rewards[::num_views].argmax())
    assert log_probs.grad[best * num_views] < 0 and abs(float(advantages.sum())) < 1e-5


# ----------------------------------------------------------------------------- image statistics


def test_image_statistics():
    grey = torch.zeros(1, 2, 3, 8, 8)
    red = torch.stack([torch.ones(8, 8), -torch.ones(8, 8), -torch.ones(8, 8)])[None, None]
    stats = image_statistics(torch.cat([grey, red.expand(1, 2, -1, -1, -1)]))
    assert all(value.shape == (2, 2) for value in stats.values())
    torch.testing.assert_close(stats["contrast"], torch.zeros(2, 2))
    torch.testing.assert_close(stats["saturation"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(stats["mean_red"], torch.tensor([[0.5, 0.5], [1.0, 1.0]]))
    torch.testing.assert_close(stats["mean_blue"], torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    checker = torch.where(torch.arange(64).reshape(8, 8) % 2 == 0, 1.0, -1.0).expand(1, 1, 3, 8, 8)
    assert float(image_statistics(checker)["contrast"]) == pytest.approx(0.5, rel=1e-2)
