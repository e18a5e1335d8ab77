"""A cheap stand-in with MEt3R's call signature, for smoke tests of the training script without MEt3R weights.

`FeatureConsistencyMetric` scores a view pair as the masked mean of `1 - cos(F(view_i), F(view_j))` over pixels,
with `F` a fixed, randomly initialised two-layer convolution. Its "geometry" is a fixed horizontal shift of
`shift` pixels per view index difference (the overlap is the columns both views see), and `empty_pairs` lists
pairs whose overlap is forced empty, so that NaN handling can be exercised. Like MEt3R it is differentiable w.r.t.
the images through the features only, and pairs without overlap score NaN.

Use it from the script with `--met3r_factory training/toy_metric.py:FeatureConsistencyMetric`.
"""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from met3r_diffusers.views import PairSpec, resolve_pairs


class FeatureConsistencyMetric(nn.Module):
    """`metric(views (B, V, 3, H, W) in [-1, 1], pairs=...)` -> namespace with MEt3ROutput's fields."""

    def __init__(self, channels: int = 16, shift: int = 0, empty_pairs: Sequence[Sequence[int]] = (), seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        for conv in (self.conv1, self.conv2):
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) / (conv.weight[0].numel() ** 0.5)
            conv.bias.data = 0.1 * torch.randn(conv.bias.shape, generator=generator)
        self.shift = shift
        self.empty_pairs = {tuple(pair) for pair in empty_pairs}
        self.requires_grad_(False)

    def forward(
        self,
        images: torch.Tensor,
        pairs: PairSpec = "adjacent",
        return_score_map: bool = False,
        return_overlap_mask: bool = False,
    ) -> SimpleNamespace:
        batch, num_views, _, height, width = images.shape
        pair_list = resolve_pairs(pairs, num_views)
        features = self.conv2(F.gelu(self.conv1(images.flatten(0, 1)))).unflatten(0, (batch, num_views))
        score_maps, masks = [], []
        for i, j in pair_list:
            offset = self.shift * (j - i)
            # detached "geometry": view i's features moved by `offset` columns onto view j's pixel grid
            warped = torch.roll(features[:, i], shifts=-offset, dims=-1)
            score_maps.append(1 - F.cosine_similarity(warped, features[:, j], dim=1))
            mask = torch.zeros(batch, height, width, dtype=torch.bool, device=images.device)
            if (i, j) not in self.empty_pairs:
                columns = slice(0, width - offset) if offset >= 0 else slice(-offset, width)
                mask[..., columns] = True
            masks.append(mask)
        score_map, overlap_mask = torch.stack(score_maps, 1), torch.stack(masks, 1)  # (B, P, H, W)
        weights = overlap_mask.to(score_map.dtype)
        # plain masked mean, 0/0 = NaN without overlap, as MEt3R reports it
        pair_scores = (score_map * weights).sum((-2, -1)) / weights.sum((-2, -1))
        return SimpleNamespace(
            score=pair_scores.nanmean(1),
            pair_scores=pair_scores,
            overlap_fraction=weights.mean((-2, -1)),
            score_map=score_map if return_score_map else None,
            overlap_mask=overlap_mask if return_overlap_mask else None,
        )
