"""DPT head (dense prediction transformer) as used by DUSt3R and MASt3R.

Four token maps tapped from the decoder are reassembled into a 4-level feature pyramid, fused
coarse-to-fine by RefineNet-style blocks and decoded to a full-resolution map. Parameter names
match the official checkpoints (`act_postprocess`, `scratch.layer_rn`, `scratch.refinenetN`,
`head`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Official checkpoints register each projection conv twice (`scratch.layerN_rn` and
# `scratch.layer_rn.{N-1}`, one shared Parameter). Loading resolves to the `layer_rn` value.
_ALIASES = {f"scratch.layer{i + 1}_rn.weight": f"scratch.layer_rn.{i}.weight" for i in range(4)}
# Present in official checkpoints but never used: refinenet4 has no skip input.
_UNUSED_PREFIX = "scratch.refinenet4.resConfUnit1."


class _ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x))))."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """Adds the refined skip map to the incoming path, refines, upsamples x2, projects (1x1)."""

    def __init__(self, features: int, with_skip: bool = True):
        super().__init__()
        if with_skip:
            self.resConfUnit1 = _ResidualConvUnit(features)
        self.resConfUnit2 = _ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        # the 1x1 projection commutes with bilinear upsampling: apply it on the 4x smaller map
        x = self.out_conv(self.resConfUnit2(x))
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class _Scratch(nn.Module):
    """Projections of the four pyramid levels to a common width, and the fusion blocks."""

    def __init__(self, layer_dims: Sequence[int], features: int):
        super().__init__()
        self.layer_rn = nn.ModuleList(nn.Conv2d(d, features, kernel_size=3, padding=1, bias=False) for d in layer_dims)
        self.refinenet1 = _FusionBlock(features)
        self.refinenet2 = _FusionBlock(features)
        self.refinenet3 = _FusionBlock(features)
        self.refinenet4 = _FusionBlock(features, with_skip=False)


class DPTHead(nn.Module):
    """DPT decoder: list of token maps -> (B, out_channels, H, W) for a patch size of 16."""

    def __init__(
        self,
        hooks: Sequence[int],
        dim_tokens: Sequence[int],
        out_channels: int,
        features: int = 256,
        last_dim: int = 128,
        layer_dims: Sequence[int] = (96, 192, 384, 768),
    ):
        super().__init__()
        self.hooks = list(hooks)
        d = layer_dims
        # token grid (h, w) -> 4h, 2h, h, ceil(h/2)
        self.act_postprocess = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim_tokens[0], d[0], 1), nn.ConvTranspose2d(d[0], d[0], kernel_size=4, stride=4)),
            nn.Sequential(nn.Conv2d(dim_tokens[1], d[1], 1), nn.ConvTranspose2d(d[1], d[1], kernel_size=2, stride=2)),
            nn.Sequential(nn.Conv2d(dim_tokens[2], d[2], 1)),
            nn.Sequential(nn.Conv2d(dim_tokens[3], d[3], 1), nn.Conv2d(d[3], d[3], kernel_size=3, stride=2, padding=1)),
        ])
        self.scratch = _Scratch(layer_dims, features)
        self.head = nn.Sequential(
            nn.Conv2d(features, features // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, last_dim, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(last_dim, out_channels, kernel_size=1),
        )
        self._register_load_state_dict_pre_hook(self._resolve_official_names)

    @staticmethod
    def _resolve_official_names(state_dict, prefix, *args) -> None:
        for alias, name in _ALIASES.items():
            if prefix + alias in state_dict:
                value = state_dict.pop(prefix + alias)
                state_dict.setdefault(prefix + name, value)
        for key in [k for k in state_dict if k.startswith(prefix + _UNUSED_PREFIX)]:
            del state_dict[key]

    def forward(self, tokens: Sequence[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """tokens: the decoder list (each (B, N, C)); image_size: (H, W) -> (B, out_channels, H, W)."""
        grid_h, grid_w = image_size[0] // 16, image_size[1] // 16
        layers = []
        for level, hook in enumerate(self.hooks):
            x = tokens[hook].transpose(1, 2).unflatten(-1, (grid_h, grid_w))
            x = self.act_postprocess[level](x).contiguous(memory_format=torch.channels_last)  # faster convs on CPU
            layers.append(self.scratch.layer_rn[level](x))
        path = self.scratch.refinenet4(layers[3])
        path = path[:, :, : layers[2].shape[2], : layers[2].shape[3]]  # odd grids: ceil(h/2)*2 > h
        path = self.scratch.refinenet3(path, layers[2])
        path = self.scratch.refinenet2(path, layers[1])
        path = self.scratch.refinenet1(path, layers[0])
        return self.head(path)
