"""View layouts (batch / frames / grid) and pair selection."""
from __future__ import annotations

import pytest
import torch

from met3r_diffusers.diffusion import ViewLayout
from met3r_diffusers.pairs import resolve_pairs


def test_resolve_pairs_modes():
    assert resolve_pairs("adjacent", 4) == [(0, 1), (1, 2), (2, 3)]
    assert resolve_pairs("reference", 3) == [(0, 1), (0, 2)]
    assert resolve_pairs("all", 3) == [(0, 1), (0, 2), (1, 2)]
    assert resolve_pairs(None, 2) == [(0, 1)]
    assert resolve_pairs([(2, 0)], 3) == [(2, 0)]
    with pytest.raises(ValueError, match="pairs"):
        resolve_pairs("ring", 3)


def test_batch_layout_groups_consecutive_entries():
    layout = ViewLayout.parse("batch", num_views=3)
    latents = torch.arange(6.0).reshape(6, 1, 1, 1).expand(6, 4, 2, 2)
    to_decode, batch = layout.to_decode(latents)
    assert batch == 2 and to_decode is latents
    images = torch.arange(6.0).reshape(6, 1, 1, 1).expand(6, 3, 4, 4)
    views = layout.to_views(images, batch)
    assert views.shape == (2, 3, 3, 4, 4)
    assert views[1, :, 0, 0, 0].tolist() == [3.0, 4.0, 5.0]
    # num_views=None: the whole batch is one sample
    assert ViewLayout.parse("batch").to_decode(latents)[1] == 1
    with pytest.raises(ValueError, match="multiple of num_views"):
        ViewLayout.parse("batch", num_views=4).to_decode(latents)


@pytest.mark.parametrize("option, frame_dim", [("frames", 1), ("frames:bfchw", 1), ("frames:bcfhw", 2)])
def test_frames_layout_both_axis_orders(option, frame_dim):
    layout = ViewLayout.parse(option)
    video = torch.randn(2, 5, 4, 3, 3)  # (B, F, C, h, w)
    latents = video if frame_dim == 1 else video.transpose(1, 2).contiguous()
    to_decode, batch = layout.to_decode(latents)
    assert batch == 2 and to_decode.shape == (10, 4, 3, 3)
    torch.testing.assert_close(to_decode, video.flatten(0, 1))
    views = layout.to_views(torch.randn(10, 3, 8, 8), batch)
    assert views.shape == (2, 5, 3, 8, 8)


def test_frames_layout_auto_axis_and_subsampling():
    video = torch.randn(1, 4, 6, 3, 3)  # (B, C=4, F=6, h, w): channels first
    to_decode, _ = ViewLayout("frames").to_decode(video, latent_channels=4)
    torch.testing.assert_close(to_decode, video.transpose(1, 2).flatten(0, 1))
    layout = ViewLayout("frames", num_views=3)
    to_decode, batch = layout.to_decode(video, latent_channels=4)
    assert batch == 1 and to_decode.shape == (3, 4, 3, 3)
    torch.testing.assert_close(to_decode, video.transpose(1, 2)[0, [0, 2, 5]].contiguous())  # evenly spaced
    with pytest.raises(ValueError, match="exceeds"):
        ViewLayout("frames", num_views=8).to_decode(video, latent_channels=4)
    with pytest.raises(ValueError, match="5-D"):
        ViewLayout("frames").to_decode(torch.randn(2, 4, 3, 3))


def test_grid_layout_splits_tiles_row_major():
    layout = ViewLayout.parse("grid:3x2")
    assert layout.grid == (3, 2)
    image = torch.zeros(1, 3, 6, 4)
    for r in range(3):
        for c in range(2):
            image[:, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = 10 * r + c
    latents = torch.randn(1, 4, 3, 2)
    assert layout.to_decode(latents)[1] == 1
    views = layout.to_views(image, 1)
    assert views.shape == (1, 6, 3, 2, 2)
    assert views[0, :, 0, 0, 0].tolist() == [0, 1, 10, 11, 20, 21]
    assert ViewLayout.parse("grid:3x2", num_views=4).to_views(image, 1).shape == (1, 4, 3, 2, 2)
    with pytest.raises(ValueError, match="does not split"):
        layout.to_views(torch.zeros(1, 3, 7, 4), 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "tiles"}, "layout"),
        ({"kind": "grid"}, "grid"),
        ({"kind": "grid", "grid": (1, 1)}, "grid"),
        ({"kind": "grid", "grid": (2, 2), "num_views": 5}, "exceeds"),
        ({"kind": "batch", "num_views": 1}, "num_views"),
        ({"kind": "frames", "frame_dim": 3}, "frame_dim"),
    ],
)
def test_layout_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViewLayout(**kwargs)


def test_parse_errors():
    for bad in ("grid", "grid:3by2", "frames:fbchw", "batch:2"):
        with pytest.raises(ValueError, match="layout"):
            ViewLayout.parse(bad)
    with pytest.raises(TypeError, match="layout"):
        ViewLayout.parse(3)


def test_a_single_pair_tuple():
    assert resolve_pairs((2, 0), 3) == [(2, 0)]
    assert resolve_pairs([1, 2], 3) == [(1, 2)]
    assert resolve_pairs([(1, 2)], 3) == [(1, 2)]
