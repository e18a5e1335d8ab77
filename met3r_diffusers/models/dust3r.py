"""DUSt3R: asymmetric CroCo encoder/decoder with two DPT heads predicting point maps.

Weight-compatible with the official `AsymmetricCroCo3DStereo` checkpoints (for example
`naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt`). Both views are encoded by one shared ViT; two
decoders exchange information through cross-attention in lockstep; head 1 predicts view 1's
point map and head 2 predicts view 2's point map in view 1's camera frame.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar, Union

import torch
from torch import nn

from .. import hub
from .croco import DecoderBlock, EncoderBlock, PatchEmbed, rope_tables
from .dpt import DPTHead

ShapeLike = Union[torch.Tensor, Sequence[int]]

_INF = float("inf")
# `patch_embed_cls` values of the official code; the official checkpoint loader rewrites the
# training-time `ManyAR_PatchEmbed` to `PatchEmbedDust3R` (with `landscape_only=False`) for
# inference, and this implementation always runs that inference configuration.
_PATCH_EMBEDS = ("PatchEmbedDust3R", "ManyAR_PatchEmbed")
# what a checkpoint of each network holds: official class name and head type (to name the right loader)
_CHECKPOINT_KINDS = {"DUSt3R": ("AsymmetricCroCo3DStereo", "dpt"), "MASt3R": ("AsymmetricMASt3R", "catmlp+dpt")}


def _as_float(value: Any) -> float:
    # the parity manifests and some JSON configs write infinities as "inf" / "-inf"
    return float(value) if isinstance(value, str) else value


def parse_mode(value: Sequence[Any], name: str) -> tuple[str, float, float]:
    """Normalise an official `(kind, vmin, vmax)` mode (JSON lists and "inf" strings allowed)."""
    if isinstance(value, str) or len(value) != 3:
        raise ValueError(f"{name} must be (kind, vmin, vmax), got {value!r}")
    kind, vmin, vmax = value[0], _as_float(value[1]), _as_float(value[2])
    if kind != "exp":
        raise ValueError(f"{name}: only the 'exp' mode of the released checkpoints is supported, got {kind!r}")
    return kind, vmin, vmax


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 (a head under CPU autocast) -> float32; float32 and float64 unchanged."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def exp_confidence(raw: torch.Tensor, mode: tuple[str, float, float]) -> torch.Tensor:
    """Official "exp" confidence: `vmin + exp(raw)`, capped at `vmax` (mode from `parse_mode`)."""
    _, vmin, vmax = mode
    return vmin + raw.exp().clamp(max=vmax - vmin)


def _to_hw(shape: ShapeLike, name: str) -> tuple[int, int]:
    """(H, W) from a (B, 2) true_shape tensor (one shape per batch) or an (H, W) pair."""
    if isinstance(shape, torch.Tensor):
        shape = shape.reshape(-1, 2)
        if not bool((shape == shape[:1]).all()):
            raise ValueError(f"{name}: all samples of a batch must share one (H, W), got {shape.tolist()}")
        shape = shape[0].tolist()
    if len(shape) != 2:
        raise ValueError(f"{name} must be (H, W) or a (B, 2) tensor, got {shape!r}")
    return int(shape[0]), int(shape[1])


class _DPTPts3dHead(nn.Module):
    """DPT head predicting 3 point channels + 1 confidence channel per pixel."""

    def __init__(self, hooks: Sequence[int], dim_tokens: Sequence[int]):
        super().__init__()
        self.dpt = DPTHead(hooks, dim_tokens, out_channels=4)

    def forward(self, tokens: Sequence[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        return self.dpt(tokens, image_size)


class DUSt3R(nn.Module):
    """DUSt3R pair network: `(view1, view2) -> (pred1, pred2)` with the official output keys.

    Constructor arguments are the official `AsymmetricCroCo3DStereo` keyword arguments; defaults
    are those of the released ViT-Large / 512 / DPT checkpoint. Training-only arguments
    (`freeze`, `mask_ratio`) are accepted and ignored.
    """

    _official_class_name: ClassVar[str] = "AsymmetricCroCo3DStereo"
    # defaults of the official constructor, applied to checkpoints that leave arguments out
    _official_defaults: ClassVar[dict[str, Any]] = {
        "output_mode": "pts3d", "head_type": "linear", "depth_mode": ("exp", -_INF, _INF),
        "conf_mode": ("exp", 1, _INF), "landscape_only": True, "patch_embed_cls": "PatchEmbedDust3R",
        "img_size": 224, "patch_size": 16, "enc_embed_dim": 768, "enc_depth": 12, "enc_num_heads": 12,
        "dec_embed_dim": 512, "dec_depth": 8, "dec_num_heads": 16, "mlp_ratio": 4.0, "norm_im2_in_dec": True,
        "pos_embed": "cosine",
    }

    def __init__(
        self,
        output_mode: str = "pts3d",
        head_type: str = "dpt",
        depth_mode: Sequence[Any] = ("exp", -_INF, _INF),
        conf_mode: Sequence[Any] = ("exp", 1, _INF),
        freeze: str = "none",
        landscape_only: bool = False,
        patch_embed_cls: str = "PatchEmbedDust3R",
        img_size: int | Sequence[int] = (512, 512),
        patch_size: int = 16,
        mask_ratio: float = 0.9,
        enc_embed_dim: int = 1024,
        enc_depth: int = 24,
        enc_num_heads: int = 16,
        dec_embed_dim: int = 768,
        dec_depth: int = 12,
        dec_num_heads: int = 12,
        mlp_ratio: float = 4.0,
        norm_im2_in_dec: bool = True,
        pos_embed: str = "RoPE100",
    ):
        super().__init__()
        if patch_size != 16:
            raise ValueError(f"patch_size: the DPT head needs 16, got {patch_size}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if len(img_size) != 2 or img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size must be multiples of {patch_size}, got {img_size}")
        if patch_embed_cls not in _PATCH_EMBEDS:
            raise ValueError(f"patch_embed_cls must be one of {_PATCH_EMBEDS}, got {patch_embed_cls!r}")
        if not (isinstance(pos_embed, str) and pos_embed.startswith("RoPE")):
            raise ValueError(f"pos_embed: only 'RoPE<base>' (e.g. 'RoPE100') is supported, got {pos_embed!r}")
        if dec_depth < 10:
            raise ValueError(f"dec_depth must be at least 10 for the DPT head, got {dec_depth}")
        self.depth_mode = parse_mode(depth_mode, "depth_mode")
        if self.depth_mode[1:] != (-_INF, _INF):
            raise ValueError(f"depth_mode: bounded depth is not supported, got {depth_mode!r}")
        self.conf_mode = parse_mode(conf_mode, "conf_mode")
        self._check_head(head_type, output_mode)
        # constructor arguments as save_pretrained writes them (the inference patch embedding)
        self.config = {
            "output_mode": output_mode, "head_type": head_type, "depth_mode": list(self.depth_mode),
            "conf_mode": list(self.conf_mode), "landscape_only": False, "patch_embed_cls": "PatchEmbedDust3R",
            "img_size": list(img_size), "patch_size": patch_size, "enc_embed_dim": enc_embed_dim,
            "enc_depth": enc_depth, "enc_num_heads": enc_num_heads, "dec_embed_dim": dec_embed_dim,
            "dec_depth": dec_depth, "dec_num_heads": dec_num_heads, "mlp_ratio": mlp_ratio,
            "norm_im2_in_dec": norm_im2_in_dec, "pos_embed": pos_embed,
        }
        self.rope_base = float(pos_embed[len("RoPE"):])

        self.patch_embed = PatchEmbed(patch_size, 3, enc_embed_dim)
        self.enc_blocks = nn.ModuleList(EncoderBlock(enc_embed_dim, enc_num_heads, mlp_ratio) for _ in range(enc_depth))
        self.enc_norm = nn.LayerNorm(enc_embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(enc_embed_dim, dec_embed_dim)
        self.dec_blocks = nn.ModuleList(
            DecoderBlock(dec_embed_dim, dec_num_heads, mlp_ratio, norm_im2_in_dec) for _ in range(dec_depth)
        )
        self.dec_blocks2 = nn.ModuleList(
            DecoderBlock(dec_embed_dim, dec_num_heads, mlp_ratio, norm_im2_in_dec) for _ in range(dec_depth)
        )
        self.dec_norm = nn.LayerNorm(dec_embed_dim, eps=1e-6)
        hooks = [0, dec_depth * 2 // 4, dec_depth * 3 // 4, dec_depth]
        dims = [enc_embed_dim, dec_embed_dim, dec_embed_dim, dec_embed_dim]
        self.downstream_head1 = self._make_head(hooks, dims)
        self.downstream_head2 = self._make_head(hooks, dims)
        self._register_load_state_dict_pre_hook(self._resolve_official_names)

    # --- head configuration (MASt3R overrides these) ---

    @staticmethod
    def _check_head(head_type: str, output_mode: str) -> None:
        if head_type != "dpt":
            raise ValueError(f"head_type: only 'dpt' is supported for DUSt3R, got {head_type!r}")
        if output_mode != "pts3d":
            raise ValueError(f"output_mode: only 'pts3d' is supported for DUSt3R, got {output_mode!r}")

    def _make_head(self, hooks: list[int], dims: list[int]) -> nn.Module:
        return _DPTPts3dHead(hooks, dims)

    def _predict(
        self, head: nn.Module, tokens: list[torch.Tensor], image_size: tuple[int, int], descriptors: bool
    ) -> dict[str, torch.Tensor]:
        """Run one head on its tokens (in the head's dtype) and map its raw output to the official keys."""
        return self._points_and_conf(head(tokens, image_size))

    def _points_and_conf(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw DPT output (B, 4, H, W) -> {"pts3d": (B, H, W, 3), "conf": (B, H, W)}, at least float32."""
        fmap = at_least_float32(raw).permute(0, 2, 3, 1)
        xyz = fmap[..., 0:3]
        depth = xyz.norm(dim=-1, keepdim=True)
        pts3d = xyz / depth.clamp(min=1e-8) * torch.expm1(depth)
        return {"pts3d": pts3d, "conf": exp_confidence(fmap[..., 3], self.conf_mode)}

    # --- loading ---

    @staticmethod
    def _resolve_official_names(state_dict, prefix, *args) -> None:
        state_dict.pop(prefix + "mask_token", None)  # masked-image pretraining only
        # official loading fills a missing second decoder from the first one
        dec2 = prefix + "dec_blocks2."
        if not any(k.startswith(dec2) for k in state_dict):
            dec1 = prefix + "dec_blocks."
            for key in [k for k in state_dict if k.startswith(dec1)]:
                state_dict[dec2 + key[len(dec1):]] = state_dict[key]

    @classmethod
    def _check_kind(cls, checkpoint: hub.Checkpoint, source: str) -> None:
        """Raise ValueError naming the right class when a checkpoint holds the other network."""
        own_head = next(head for official, head in _CHECKPOINT_KINDS.values() if official == cls._official_class_name)
        head = checkpoint.config.get("head_type")
        for name, (official, head_type) in _CHECKPOINT_KINDS.items():
            if official != cls._official_class_name and (
                checkpoint.class_name == official or (checkpoint.class_name is None and head == head_type)
            ):
                raise ValueError(
                    f"{source}: checkpoint holds a {official} ({name}, head_type {head_type!r}), but {cls.__name__} "
                    f"loads {cls._official_class_name} (head_type: only {own_head!r} is supported for "
                    f"{cls.__name__}); load it with {name}.from_pretrained"
                )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ) -> DUSt3R:
        """Load from a Hugging Face repo id, a local directory (config.json + model.safetensors)
        or a local official `.pth` checkpoint."""
        checkpoint = hub.load_pretrained(
            name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        source = checkpoint.source or str(name_or_path)
        cls._check_kind(checkpoint, source)
        if checkpoint.class_name is not None and checkpoint.class_name != cls._official_class_name:
            raise ValueError(
                f"{source}: checkpoint holds a {checkpoint.class_name}, "
                f"but {cls.__name__} loads {cls._official_class_name}"
            )
        hub.validate_config(cls, checkpoint.config, source)
        kwargs = {**cls._official_defaults, **checkpoint.config}
        try:
            with torch.device("meta"):
                model = cls(**kwargs)
        except ValueError as err:  # the constructor names the argument
            raise ValueError(f"{source}: {err}") from err
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint.state_dict.items()}
        hub.load_state_dict_strict(model, state_dict, assign=True, source=str(name_or_path))
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (the layout `from_pretrained` reads)."""
        hub.save_pretrained(self.state_dict(), self.config, save_directory)

    # --- forward ---

    def encode_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images (N, 3, H, W) in [-1, 1] -> tokens (N, L, enc_dim) after the encoder norm,
        and patch positions (N, L, 2)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        x, pos = self.patch_embed(images)
        head_dim = x.shape[-1] // self.enc_blocks[0].attn.num_heads
        rope = rope_tables(pos, head_dim, self.rope_base)
        for block in self.enc_blocks:
            x = block(x, rope)
        return self.enc_norm(x), pos

    def _decode(
        self, tokens1: torch.Tensor, pos1: torch.Tensor, tokens2: torch.Tensor, pos2: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run both decoders in lockstep; returns per view [encoder tokens, block 1, ..., block L (normed)]."""
        head_dim = self.decoder_embed.out_features // self.dec_blocks[0].attn.num_heads
        rope1 = rope_tables(pos1, head_dim, self.rope_base)
        rope2 = rope_tables(pos2, head_dim, self.rope_base)
        x1, x2 = self.decoder_embed(tokens1), self.decoder_embed(tokens2)
        out1, out2 = [tokens1], [tokens2]
        for block1, block2 in zip(self.dec_blocks, self.dec_blocks2):
            # both stacks read the other view's tokens from before this block
            x1, x2 = block1(x1, x2, rope1, rope2), block2(x2, x1, rope2, rope1)
            out1.append(x1)
            out2.append(x2)
        out1[-1], out2[-1] = self.dec_norm(x1), self.dec_norm(x2)
        return out1, out2

    def decode_pair(
        self,
        tokens1: torch.Tensor,
        pos1: torch.Tensor,
        tokens2: torch.Tensor,
        pos2: torch.Tensor,
        shape1: ShapeLike,
        shape2: ShapeLike,
        descriptors: bool = True,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Decode a pair of encoded views (from `encode_views`); shapes are (H, W) or (B, 2) true_shape.

        `descriptors=False` skips MASt3R's descriptor head ("desc"/"desc_conf" are then absent; the
        point maps and confidences are unchanged); DUSt3R has no descriptors and ignores it.
        """
        if tokens1.shape[0] != tokens2.shape[0]:
            raise ValueError(f"tokens1/tokens2: batch sizes differ ({tokens1.shape[0]} vs {tokens2.shape[0]})")
        size1, size2 = _to_hw(shape1, "shape1"), _to_hw(shape2, "shape2")
        for name, size, tokens in (("shape1", size1, tokens1), ("shape2", size2, tokens2)):
            if (size[0] // 16) * (size[1] // 16) != tokens.shape[1] or size[0] % 16 or size[1] % 16:
                raise ValueError(f"{name}={size} does not match {tokens.shape[1]} tokens of 16x16 patches")
        dec1, dec2 = self._decode(tokens1, pos1, tokens2, pos2)
        # As the official forward: tokens into the heads in the heads' dtype (float32 unless the
        # weights were cast), outside *CUDA* autocast (`torch.cuda.amp.autocast(enabled=False)`
        # there); CPU autocast still covers them.
        head_dtype = self.downstream_head1.dpt.head[0].weight.dtype
        with torch.autocast("cuda", enabled=False):
            pred1 = self._predict(self.downstream_head1, [t.to(head_dtype) for t in dec1], size1, descriptors)
            pred2 = self._predict(self.downstream_head2, [t.to(head_dtype) for t in dec2], size2, descriptors)
        pred2["pts3d_in_other_view"] = pred2.pop("pts3d")
        return pred1, pred2

    def forward(
        self, view1: dict[str, Any], view2: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """view = {"img": (B, 3, H, W) in [-1, 1], optional "true_shape": (B, 2)} -> (pred1, pred2)."""
        img1, img2 = view1["img"], view2["img"]
        if img1.shape[0] != img2.shape[0]:
            raise ValueError(f"view1/view2: batch sizes differ ({img1.shape[0]} vs {img2.shape[0]})")
        shapes = []
        for name, view in (("view1", view1), ("view2", view2)):
            size = tuple(view["img"].shape[-2:])
            if "true_shape" in view and _to_hw(view["true_shape"], f"{name}['true_shape']") != size:
                raise ValueError(f"{name}['true_shape'] must match the image size {size}")
            shapes.append(size)
        if img1.shape[-2:] == img2.shape[-2:]:  # one encoder pass for both views
            tokens, pos = self.encode_views(torch.cat((img1, img2)))
            (tokens1, tokens2), (pos1, pos2) = tokens.chunk(2), pos.chunk(2)
        else:
            (tokens1, pos1), (tokens2, pos2) = self.encode_views(img1), self.encode_views(img2)
        return self.decode_pair(tokens1, pos1, tokens2, pos2, shapes[0], shapes[1])
