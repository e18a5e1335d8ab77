"""Tiny stand-ins for tests, benchmarks, docs and smoke runs: no weights, no network, CPU-fast.

Metric stand-ins:

* `tiny_met3r()`: the real `MEt3R` (focal, rendering, score) on `PlaneGeometry` (a fronto-parallel plane, the
  official geometry call signature) and `TinyFeatures` (a fixed random convolution), so scores are finite, pairs
  overlap, and gradients reach the images through the features exactly as with DINO + FeatUp. Usable as a
  training-script factory: `--met3r_factory met3r_diffusers.testing:tiny_met3r --met3r_kwargs '{"seed": 0}'`.
* `FeatureConsistencyMetric`: a cheaper metric with MEt3R's call signature and output fields whose "geometry" is a
  fixed horizontal shift; `empty_pairs` forces pairs without overlap to exercise NaN handling.

diffusers stand-ins (need the `diffusers` extra): `tiny_clip_tokenizer`, `tiny_text_encoder`, `tiny_vae`,
`tiny_unet`, `tiny_sd_components` (a 32x32 StableDiffusionPipeline) and `tiny_training_components` (the training
scripts' `--tiny_test_model`). Every builder seeds torch's global RNG itself, so its weights are reproducible.
`reset_accelerate_state` lets one process run a training script several times (tests, experiments).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from .distances import get_distance
from .metric import MEt3R, MEt3ROutput
from .pairs import PairSpec, resolve_pairs

__all__ = [
    "PLANE_FOCAL", "TINY_MAST3R", "TINY_TRAINING_VAE_SCALE_FACTOR", "FeatureConsistencyMetric", "PlaneGeometry", "TinyFeatures", "plane_points",
    "tiny_clip_tokenizer", "tiny_met3r", "tiny_sd_components", "tiny_text_encoder", "tiny_training_components",
    "reset_accelerate_state", "tiny_unet", "tiny_vae",
]

# Constructor arguments of a tiny MASt3R (the parity fixtures' `mast3r_tiny_catmlpdpt` config, 64x64 images).
TINY_MAST3R = {
    "enc_embed_dim": 64, "enc_depth": 2, "enc_num_heads": 2, "dec_embed_dim": 48, "dec_depth": 10,
    "dec_num_heads": 2, "img_size": (64, 64),
}
PLANE_FOCAL = 40.0  # pixels; the plane's points lie on the rays of a pinhole with this focal
TINY_TRAINING_VAE_SCALE_FACTOR = 4  # tiny_training_components' VAE: three levels, 4x down-sampling


# ----------------------------------------------------------------------------- metric stand-ins


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
        """(N, 3, H, W) -> (N, C, H/4, W/4)."""
        self.images_seen += images.shape[0]
        return self.conv(images)


def plane_points(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, H, W, 3) points of a plane at depth 2 on the pixel rays of a pinhole with focal PLANE_FOCAL."""
    v, u = torch.meshgrid(
        torch.arange(height) - height / 2 + 0.5, torch.arange(width) - width / 2 + 0.5, indexing="ij"
    )
    plane = torch.stack([u * 2 / PLANE_FOCAL, v * 2 / PLANE_FOCAL, torch.full_like(u, 2.0)], -1)
    return plane.expand(batch, -1, -1, -1).clone()


class PlaneGeometry(nn.Module):
    """The official geometry call signature; view 1 sees a plane at depth 2, view 2's points are shifted sideways
    in proportion to the views' brightness difference (so different pairs differ). Confidences follow the image."""

    def forward(self, view1: dict, view2: dict) -> tuple[dict, dict]:
        """Predictions with the official keys: pred1["pts3d"], pred2["pts3d_in_other_view"], both "conf"."""
        img1, img2 = view1["img"], view2["img"]
        batch, _, height, width = img1.shape
        plane = plane_points(batch, height, width).to(img1)
        shift = 0.2 * (img2.mean((1, 2, 3)) - img1.mean((1, 2, 3)))
        other = plane + torch.stack([shift, torch.zeros_like(shift), torch.zeros_like(shift)], -1)[:, None, None]
        pred1 = {"pts3d": plane, "conf": 1.5 + img1.mean(1).sigmoid()}
        pred2 = {"pts3d_in_other_view": other, "conf": 1.5 + img2.mean(1).sigmoid()}
        return pred1, pred2


def tiny_met3r(seed: int = 0, **kwargs: Any) -> MEt3R:
    """MEt3R on PlaneGeometry + TinyFeatures, rendering at the input resolution; kwargs go to `MEt3R`."""
    kwargs.setdefault("backbone", PlaneGeometry())
    kwargs.setdefault("feature_backbone", TinyFeatures(seed=seed))
    kwargs.setdefault("img_size", None)
    return MEt3R(**kwargs)


class FeatureConsistencyMetric(nn.Module):
    """`metric(views (B, V, 3, H, W) in [-1, 1], pairs=...)` -> `MEt3ROutput`, without any geometry network.

    A view pair scores the masked mean of `1 - cos(F(view_i), F(view_j))` over pixels, with `F` a fixed, randomly
    initialised two-layer convolution. Its "geometry" is a fixed horizontal shift of `shift` pixels per view index
    difference (the overlap is the columns both views see); `empty_pairs` lists pairs whose overlap is forced
    empty. Like MEt3R it is differentiable w.r.t. the images through the features only, and pairs without overlap
    score NaN -- here with a NaN gradient -- or 0 with `empty="zero"` (through `functional.pair_scores`).
    """

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
        self.distance_fn = get_distance("cosine")
        self.requires_grad_(False)

    def forward(
        self,
        images: torch.Tensor,
        pairs: PairSpec = "adjacent",
        return_score_map: bool = False,
        return_overlap_mask: bool = False,
        empty: str = "nan",
    ) -> MEt3ROutput:
        """Score the pairs of `images`; the maps are (B, P, H, W) when requested."""
        batch, num_views, _, height, width = images.shape
        pair_list = resolve_pairs(pairs, num_views)
        features = self.conv2(F.gelu(self.conv1(images.flatten(0, 1)))).unflatten(0, (batch, num_views))
        score_maps, masks = [], []
        for i, j in pair_list:
            offset = self.shift * (j - i)
            # detached "geometry": view i's features moved by `offset` columns onto view j's pixel grid
            warped = torch.roll(features[:, i], shifts=-offset, dims=-1)
            score_maps.append(1 - F.cosine_similarity(warped, features[:, j], dim=1))
            mask = torch.zeros(batch, height, width, dtype=images.dtype, device=images.device)
            if (i, j) not in self.empty_pairs:
                columns = slice(0, width - offset) if offset >= 0 else slice(-offset, width)
                mask[..., columns] = 1
            masks.append(mask)
        score_map, overlap_mask = torch.stack(score_maps, 1), torch.stack(masks, 1)  # (B, P, H, W)
        if empty == "nan":
            # a plain masked mean on purpose: 0/0 = NaN, whose gradient is NaN too, like many external metrics
            # (what MEt3RLoss and guidance must survive); MEt3R itself selects its NaN with torch.where
            scores = (score_map * overlap_mask).sum((-2, -1)) / overlap_mask.sum((-2, -1))
            valid = overlap_mask.sum((-2, -1)) > 0
        else:
            scores, valid = functional.pair_scores(
                score_map.flatten(0, 1), overlap_mask.flatten(0, 1), self.distance_fn, empty=empty
            )
            scores, valid = scores.unflatten(0, (batch, -1)), valid.unflatten(0, (batch, -1))
        return MEt3ROutput(
            score=functional.sample_scores(scores, valid, empty),
            pair_scores=scores,
            overlap_fraction=overlap_mask.mean((-2, -1)),
            pairs=pair_list,
            score_map=score_map if return_score_map else None,
            overlap_mask=overlap_mask if return_overlap_mask else None,
            valid=valid,
        )


# ----------------------------------------------------------------------------- diffusers stand-ins


def tiny_clip_tokenizer(directory: str | os.PathLike | None = None, model_max_length: int = 16):
    """A CLIP tokenizer over GPT-2's 256 byte characters (each a token, no merges), written to `directory`."""
    from transformers import CLIPTokenizer

    directory = str(directory) if directory is not None else tempfile.mkdtemp(prefix="met3r-tiny-tokenizer-")
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]  # bytes GPT-2 maps to themselves
    chars = [chr(b) for b in keep] + [chr(256 + n) for n in range(256 - len(keep))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump({token: index for index, token in enumerate(tokens)}, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=model_max_length)


def tiny_text_encoder(hidden_size: int = 16, max_position_embeddings: int = 16, seed: int = 0):
    """A seeded two-layer CLIP text model over `tiny_clip_tokenizer`'s 514 tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden_size,
        intermediate_size=2 * hidden_size, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=max_position_embeddings,
    ))


def tiny_vae(levels: int = 2, seed: int = 0, **kwargs: Any):
    """A seeded AutoencoderKL with 4 latent channels and 2**(levels-1) downsampling; kwargs go to its config."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8] + [16] * (levels - 1), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=4, norm_num_groups=4, **kwargs,
    ).eval()


def tiny_unet(
    sample_size: int = 16, width: int = 8, cross_attention_dim: int = 16, attention_head_dim: int = 4,
    norm_num_groups: int = 4, seed: int = 0, **kwargs: Any,
):
    """A seeded two-level UNet2DConditionModel (4 latent channels, `width` and 2 * `width` channels)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(width, 2 * width),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups, **kwargs,
    )


def tiny_sd_components(directory: str | os.PathLike | None = None, scheduler: Any = None) -> dict[str, Any]:
    """Tiny StableDiffusionPipeline components (32x32 images, 16x16 latents; DDIM unless `scheduler`)."""
    from diffusers import DDIMScheduler

    return {
        "unet": tiny_unet(),
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(),
        "tokenizer": tiny_clip_tokenizer(directory),
        "scheduler": scheduler or DDIMScheduler(clip_sample=False),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def tiny_training_components(
    resolution: int, num_views: int, seed: int = 0, prediction_type: str | None = None
) -> dict[str, Any]:
    """The training scripts' `--tiny_test_model`: a UNet class-conditioned on the view index, a 4x-down VAE, a
    CLIP text model and tokenizer (32 tokens) and a DDPM scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=4, norm_num_groups=4)
    unet = tiny_unet(resolution // 4, width=32, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                     seed=seed, num_class_embeds=max(num_views, 8))
    text_encoder = tiny_text_encoder(hidden_size=32, max_position_embeddings=32, seed=seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type or "epsilon")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tiny_clip_tokenizer(model_max_length=32),
            "scheduler": scheduler}


def reset_accelerate_state() -> None:
    """Clear Accelerate's singleton states, so that the next in-process training run starts from scratch."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
