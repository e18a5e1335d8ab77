"""Tiny MEt3R set-ups for tests and benchmarks: the real metric (focal, rendering, score) on toy networks.

`tiny_met3r()` needs no weights and no fixtures. Its geometry is a fronto-parallel plane (`PlaneGeometry`) and
its features a fixed random convolution (`TinyFeatures`), so scores are finite, pairs overlap, and gradients
reach the images through the features exactly as with DINO + FeatUp. Also usable as a training-script factory:
`--met3r_factory tests/_tiny.py:tiny_met3r --met3r_kwargs '{"seed": 0}'`.
"""
from __future__ import annotations

import torch
from torch import nn

from met3r_diffusers import MEt3R

# Constructor arguments of a tiny MASt3R (the parity fixtures' `mast3r_tiny_catmlpdpt` config, 64x64 images).
TINY_MAST3R = {
    "enc_embed_dim": 64, "enc_depth": 2, "enc_num_heads": 2, "dec_embed_dim": 48, "dec_depth": 10,
    "dec_num_heads": 2, "img_size": (64, 64),
}
PLANE_FOCAL = 40.0  # pixels; the plane's points lie on the rays of a pinhole with this focal


class TinyFeatures(nn.Module):
    """A fixed random 4x4/stride-4 convolution (features at 1/4 resolution); counts the images it sees."""

    def __init__(self, channels: int = 8, seed: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 4, stride=4)
        generator = torch.Generator().manual_seed(seed)
        self.conv.weight.data = torch.randn(self.conv.weight.shape, generator=generator) / 7
        self.conv.bias.data = 0.1 * torch.randn(channels, generator=generator)
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += images.shape[0]
        return self.conv(images)


def plane_points(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, H, W, 3) points of a plane at depth 2 on the pixel rays of a pinhole with focal PLANE_FOCAL."""
    v, u = torch.meshgrid(torch.arange(height) - height / 2 + 0.5, torch.arange(width) - width / 2 + 0.5,
                          indexing="ij")
    plane = torch.stack([u * 2 / PLANE_FOCAL, v * 2 / PLANE_FOCAL, torch.full_like(u, 2.0)], -1)
    return plane.expand(batch, -1, -1, -1).clone()


class PlaneGeometry(nn.Module):
    """The official geometry call signature; view 1 sees a plane at depth 2, view 2's points are shifted sideways
    in proportion to the views' brightness difference (so different pairs differ). Confidences follow the image."""

    def forward(self, view1: dict, view2: dict) -> tuple[dict, dict]:
        img1, img2 = view1["img"], view2["img"]
        batch, _, height, width = img1.shape
        plane = plane_points(batch, height, width).to(img1)
        shift = 0.2 * (img2.mean((1, 2, 3)) - img1.mean((1, 2, 3)))
        other = plane + torch.stack([shift, torch.zeros_like(shift), torch.zeros_like(shift)], -1)[:, None, None]
        pred1 = {"pts3d": plane, "conf": 1.5 + img1.mean(1).sigmoid()}
        pred2 = {"pts3d_in_other_view": other, "conf": 1.5 + img2.mean(1).sigmoid()}
        return pred1, pred2


def tiny_met3r(seed: int = 0, **kwargs) -> MEt3R:
    """MEt3R on PlaneGeometry + TinyFeatures, rendering at the input resolution."""
    kwargs.setdefault("backbone", PlaneGeometry())
    kwargs.setdefault("feature_backbone", TinyFeatures(seed=seed))
    kwargs.setdefault("img_size", None)
    return MEt3R(**kwargs)
