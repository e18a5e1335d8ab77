"""DINO ViT-S/16 as FeatUp's "dino16" featurizer uses it: last-layer patch tokens as a feature map.

Weight-compatible with the official DINO `dino_vits16` checkpoint (`facebookresearch/dino`) and
with the backbone stored inside FeatUp's `dino16` checkpoints (`model.0.model.*`). Inputs are
ImageNet-normalised images whose height and width are multiples of 16.

Beyond the original: FeatUp's copy of the patch embedding drops the last patch row *and*
column whenever the number of patch rows (H/16) is odd, which makes the official forward fail
on those sizes; here every multiple of 16 is computed, without any crop.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet statistics of the torchvision `Normalize` that DINO and FeatUp expect:
# `(image01 - mean) / std` per channel, with float32 constants and a true division.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PATCH_SIZE = 16


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # (B, N, 3*D) -> 3 x (B, heads, N, D/heads)
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class _Block(nn.Module):
    """Pre-norm transformer block."""

    compile_unit: ClassVar[bool] = True  # compiled by `models.compile.compile_units`

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major patches


class DinoVisionTransformer(nn.Module):
    """DINO ViT-S/16 (12 blocks, width 384, 6 heads): image -> all tokens after the final LayerNorm."""

    def __init__(self, dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: int = 4,
                 patch_size: int = PATCH_SIZE, pretrain_size: int = 224):
        super().__init__()
        self.patch_size = patch_size
        num_patches = (pretrain_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.patch_embed = _PatchEmbed(dim, patch_size)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio, eps=1e-6) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """Positional table (1, 1 + height*width, D) for a grid of height x width patches.

        DINO's recipe: the pretraining grid (14x14) is resized by bicubic interpolation
        (a = -0.75, clamped borders) with the scale factors ((height + 0.1) / 14, (width + 0.1) / 14)
        passed as such, so the sample positions are `(dst + 0.5) * 14 / (n + 0.1) - 0.5`; the
        14x14 grid itself is used unchanged. The CLS entry is never interpolated.
        """
        side = math.isqrt(self.pos_embed.shape[1] - 1)
        if height == side and width == side:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((height + 0.1) / side, (width + 0.1) / side), mode="bicubic",
                             align_corners=False)
        if grid.shape[-2:] != (height, width):  # cannot happen for grids below ~10^14 patches
            raise RuntimeError(f"positional embedding resized to {tuple(grid.shape[-2:])}, expected {(height, width)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, height * width, dim)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised -> (B, 1 + (H/16)*(W/16), D) tokens (CLS first)."""
        height, width = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_embed(height, width)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class DinoFeaturizer(nn.Module):
    """FeatUp's "dino16" featurizer ("token" features): (B, 3, H, W) -> (B, 384, H/16, W/16).

    Holds the ViT as `model`, so its parameters are named `model.*` as in FeatUp.
    """

    def __init__(self):
        super().__init__()
        self.model = DinoVisionTransformer()

    @property
    def dim(self) -> int:
        """Number of feature channels."""
        return self.model.pos_embed.shape[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the last layer (after the final LayerNorm, CLS dropped) as a feature map."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        size = images.shape[-2:]
        if size[0] % PATCH_SIZE or size[1] % PATCH_SIZE or min(size) == 0:
            raise ValueError(f"images: height and width must be positive multiples of {PATCH_SIZE}, got {tuple(size)}")
        height, width = size[0] // PATCH_SIZE, size[1] // PATCH_SIZE
        tokens = self.model(images)[:, 1:]
        return tokens.reshape(images.shape[0], height, width, -1).permute(0, 3, 1, 2)
