"""MASt3R: DUSt3R with an extra per-pixel local-descriptor head ("catmlp+dpt").

Weight-compatible with the official `AsymmetricMASt3R` checkpoints (for example
`naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric`). The point maps and their confidence
come from a DPT head exactly as in DUSt3R; an MLP on the concatenated encoder and final decoder
tokens predicts unit-norm descriptors (and, with `two_confs`, their own confidence) for every
pixel of each 16x16 patch.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .croco import Mlp
from .dpt import DPTHead
from .dust3r import DUSt3R, at_least_float32, exp_confidence, parse_mode


class _CatMlpDPTHead(nn.Module):
    """DPT point/confidence head plus an MLP descriptor head on [encoder tokens, last decoder tokens]."""

    def __init__(self, hooks: Sequence[int], dims: Sequence[int], desc_channels: int, patch_size: int = 16):
        super().__init__()
        self.patch_size = patch_size
        self.dpt = DPTHead(hooks, dims, out_channels=4)
        in_dim = dims[0] + dims[-1]
        self.head_local_features = Mlp(in_dim, 4 * in_dim, desc_channels * patch_size**2)

    def forward(self, tokens: Sequence[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """-> (B, 4 + desc_channels, H, W): point channels, confidence, descriptor channels."""
        pts = self.dpt(tokens, image_size)
        grid = (image_size[0] // self.patch_size, image_size[1] // self.patch_size)
        local = self.head_local_features(torch.cat((tokens[0], tokens[-1]), dim=-1))  # (B, N, C*p*p)
        # channel c*p*p + i*p + j of a token is channel c at offset (i, j) inside its patch
        local = F.pixel_shuffle(local.transpose(1, 2).unflatten(-1, grid), self.patch_size)
        return torch.cat((pts, local), dim=1)


class MASt3R(DUSt3R):
    """MASt3R pair network: DUSt3R outputs plus "desc" (B, H, W, D) and "desc_conf" (B, H, W).

    Constructor arguments are the official `AsymmetricMASt3R` keyword arguments; defaults are
    those of the released ViT-Large / 512 / catmlp+dpt / metric checkpoint.
    """

    _official_class_name: ClassVar[str] = "AsymmetricMASt3R"
    _official_defaults: ClassVar[dict[str, Any]] = {
        **DUSt3R._official_defaults, "desc_mode": "norm", "two_confs": False, "desc_conf_mode": None,
    }

    def __init__(
        self,
        output_mode: str = "pts3d+desc24",
        head_type: str = "catmlp+dpt",
        desc_mode: str = "norm",
        two_confs: bool = True,
        desc_conf_mode: Sequence[Any] | None = ("exp", 0, math.inf),
        **kwargs: Any,
    ):
        if desc_mode != "norm":
            raise ValueError(f"desc_mode: only 'norm' is supported, got {desc_mode!r}")
        match = re.fullmatch(r"pts3d\+desc(\d+)", output_mode)
        self.desc_dim = int(match.group(1)) if match else 0
        self.two_confs = bool(two_confs)
        super().__init__(output_mode=output_mode, head_type=head_type, **kwargs)
        self.desc_conf_mode = (
            self.conf_mode if desc_conf_mode is None else parse_mode(desc_conf_mode, "desc_conf_mode")
        )
        self.config.update(desc_mode="norm", two_confs=self.two_confs, desc_conf_mode=list(self.desc_conf_mode))

    @staticmethod
    def _check_head(head_type: str, output_mode: str) -> None:
        if head_type != "catmlp+dpt":
            raise ValueError(f"head_type: only 'catmlp+dpt' is supported for MASt3R, got {head_type!r}")
        if not re.fullmatch(r"pts3d\+desc\d+", output_mode):
            raise ValueError(f"output_mode must be 'pts3d+desc<dim>' for MASt3R, got {output_mode!r}")

    def _make_head(self, hooks: list[int], dims: list[int]) -> nn.Module:
        return _CatMlpDPTHead(hooks, dims, self.desc_dim + int(self.two_confs))

    def _predict(
        self, head: nn.Module, tokens: list[torch.Tensor], image_size: tuple[int, int], descriptors: bool
    ) -> dict[str, torch.Tensor]:
        """Points and confidence, plus "desc" (unit norm) and "desc_conf" unless descriptors=False."""
        if not descriptors:
            return self._points_and_conf(head.dpt(tokens, image_size))
        raw = at_least_float32(head(tokens, image_size))
        out = self._points_and_conf(raw[:, :4])
        desc = raw[:, 4 : 4 + self.desc_dim].permute(0, 2, 3, 1)
        out["desc"] = desc / desc.norm(dim=-1, keepdim=True)
        if self.two_confs:
            out["desc_conf"] = exp_confidence(raw[:, 4 + self.desc_dim], self.desc_conf_mode)
        else:
            out["desc_conf"] = out["conf"].clone()
        return out
