"""CroCo building blocks shared by DUSt3R and MASt3R: patch embedding, 2-D RoPE, ViT blocks.

Parameter names follow the official implementation so that its checkpoints load unchanged.
Positions enter only through 2-D rotary embeddings ("RoPE100"); there is no class token and
no absolute position table.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

RopeTables = tuple[torch.Tensor, torch.Tensor]


def patch_positions(batch: int, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
    """Integer patch positions `(row, col)`, row-major, shape (batch, grid_h * grid_w, 2)."""
    rows = torch.arange(grid_h, device=device)
    cols = torch.arange(grid_w, device=device)
    pos = torch.cartesian_prod(rows, cols)
    return pos.unsqueeze(0).expand(batch, -1, -1)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> RopeTables:
    """float32 cos/sin tables of the 2-D RoPE for `positions` (B, N, 2); each (B, 1, N, head_dim).

    The first half of a head's channels is rotated with the row index, the second half with the
    column index; within each half the angles are `pos * inv_freq` repeated twice ("rotate half").
    """
    if head_dim % 4 != 0:
        raise ValueError(f"head_dim must be a multiple of 4 for 2-D RoPE, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=positions.device).float() / half))
    angles = positions.float().unsqueeze(-1) * inv_freq  # (B, N, 2, half/2)
    angles = torch.cat((angles, angles), dim=-1).flatten(-2)  # (B, N, head_dim)
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rope(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate queries or keys `x` (B, heads, N, head_dim) with tables from `rope_tables`."""
    cos, sin = tables
    # the four quarters [a, b, c, d] of a head rotate as the pairs (a, b) and (c, d):
    # rotate_half of each half gives [-b, a, -d, c]
    quarters = x.unflatten(-1, (2, 2, -1))
    rotated = torch.stack((-quarters[..., 1, :], quarters[..., 0, :]), dim=-2).flatten(-3)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: (B, 3, H, W) -> tokens (B, H/p * W/p, dim), row-major."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed images; returns tokens (B, N, dim) and positions (B, N, 2)."""
        _, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"images: height and width must be multiples of {self.patch_size}, got {height}x{width}"
            )
        x = self.proj(images)
        pos = patch_positions(x.shape[0], x.shape[2], x.shape[3], images.device)
        return x.flatten(2).transpose(1, 2), pos


class Mlp(nn.Module):
    """Two-layer MLP with exact GELU."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply fc1 -> GELU -> fc2."""
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and 2-D RoPE on queries and keys."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(apply_rope(q, rope), apply_rope(k, rope), v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class CrossAttention(nn.Module):
    """Multi-head cross-attention; queries and keys are rotated with their own view's positions."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, rope_x: RopeTables, rope_y: RopeTables) -> torch.Tensor:
        """x: queries (B, Nx, dim), y: keys/values (B, Ny, dim) -> (B, Nx, dim)."""
        q = apply_rope(self._heads(self.projq(x)), rope_x)
        k = apply_rope(self._heads(self.projk(y)), rope_y)
        v = self._heads(self.projv(y))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: self-attention and MLP, each added residually."""

    compile_unit: ClassVar[bool] = True  # compiled by `models.compile.compile_units`

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: self-attention, cross-attention to the other view, MLP."""

    compile_unit: ClassVar[bool] = True

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_other: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = nn.LayerNorm(dim, eps=1e-6) if norm_other else nn.Identity()

    def forward(self, x: torch.Tensor, other: torch.Tensor, rope_x: RopeTables, rope_other: RopeTables) -> torch.Tensor:
        """x: this view's tokens (B, Nx, dim); other: the other view's tokens (B, Ny, dim)."""
        x = x + self.attn(self.norm1(x), rope_x)
        x = x + self.cross_attn(self.norm2(x), self.norm_y(other), rope_x, rope_other)
        return x + self.mlp(self.norm3(x))
