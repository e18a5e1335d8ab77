"""MEt3RCallback on tiny randomly initialised diffusers pipelines (CPU, no network).

The components are built from configs the way diffusers' own tests build them. The CLIP tokenizer is built offline
from a byte-level vocabulary written to tmp_path (every byte character, with and without the end-of-word marker,
plus the two special tokens, and no merges), so no tokenizer download is needed.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from met3r_diffusers.callbacks import MEt3RCallback
from met3r_diffusers.testing import tiny_sd_components, tiny_vae
from met3r_diffusers.diffusion import decode_latents
from met3r_diffusers.pairs import resolve_pairs

PROMPT = "a chair"


# ----------------------------------------------------------------------------- tiny components


class _FlowMatchForUNet(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEuler plus the `init_noise_sigma` and identity `scale_model_input` StableDiffusionPipeline uses."""

    init_noise_sigma = 1.0

    def scale_model_input(self, sample, timestep=None):
        return sample


SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(clip_sample=False),
    "euler": lambda: EulerDiscreteScheduler(),
    "dpm_multistep": lambda: DPMSolverMultistepScheduler(),
    "flow_match": lambda: _FlowMatchForUNet(shift=3.0),
}


@pytest.fixture()
def sd_pipe(tmp_path):
    pipe = StableDiffusionPipeline(**tiny_sd_components(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class FeatureConsistency(torch.nn.Module):
    """Stand-in consistency metric: 1 - cosine of fixed random conv features of the two views, per pixel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.requires_grad_(False)

    def forward(self, views: torch.Tensor, pairs="adjacent") -> SimpleNamespace:
        batch, num_views = views.shape[:2]
        feats = self.features(views.flatten(0, 1)).unflatten(0, (batch, num_views))
        pair_list = resolve_pairs(pairs, num_views)
        pair_scores = torch.stack(
            [(1 - F.cosine_similarity(feats[:, i], feats[:, j], dim=1)).mean((-2, -1)) for i, j in pair_list], 1
        )
        return SimpleNamespace(score=pair_scores.mean(1), pair_scores=pair_scores)


def _run(pipe, callback=None, steps=6, views=4, seed=0, **kwargs):
    extra = {}
    if callback is not None:
        extra = {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": callback.tensor_inputs}
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        num_images_per_prompt=views,
        height=32,
        width=32,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **extra,
        **kwargs,
    ).images


# ----------------------------------------------------------------------------- scoring


def test_scores_at_requested_steps_batch_layout(sd_pipe):
    metric = FeatureConsistency()
    callback = MEt3RCallback(metric, every_n_steps=2, num_views=2)
    with callback.attach(sd_pipe):
        latents = _run(sd_pipe, callback, steps=6, views=4)
    assert [entry["step"] for entry in callback.history] == [0, 2, 4, 5]
    assert [entry["timestep"] for entry in callback.history] == sd_pipe.scheduler.timesteps[[0, 2, 4, 5]].tolist()
    for entry in callback.history:
        assert entry["scores"].shape == (2,) and entry["pair_scores"].shape == (2, 1)
        assert entry["pairs"] == [(0, 1)]
    # DDIM's last step lands on its x0 estimate, so the final score is the score of the output
    with torch.no_grad():
        images = decode_latents(sd_pipe.vae, latents).unflatten(0, (2, 2))
        expected = metric(images).score
    torch.testing.assert_close(callback.history[-1]["scores"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(callback.history[0]["scores"], callback.history[-1]["scores"])
    assert "step" not in sd_pipe.scheduler.__dict__


def test_window_and_final_step(sd_pipe):
    callback = MEt3RCallback(FeatureConsistency(), start=0.5, num_views=2)
    with callback.attach(sd_pipe):
        _run(sd_pipe, callback, steps=6)
    assert [entry["step"] for entry in callback.history] == [3, 4, 5]
    callback = MEt3RCallback(FeatureConsistency(), every_n_steps=2, stop=0.5, num_views=2)
    with callback.attach(sd_pipe):
        _run(sd_pipe, callback, steps=6)
    assert [entry["step"] for entry in callback.history] == [0, 2, 5]  # the final step is always scored


def test_unattached_callback_misses_step_zero_and_warns(sd_pipe):
    callback = MEt3RCallback(FeatureConsistency(), every_n_steps=2, num_views=4)
    with pytest.warns(UserWarning, match="attach"):
        _run(sd_pipe, callback, steps=5)
    assert [entry["step"] for entry in callback.history] == [2, 4]
    assert "step" not in sd_pipe.scheduler.__dict__  # removed after the final step


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_wrapper_is_transparent_and_removed(tmp_path, name):
    pipe = StableDiffusionPipeline(**tiny_sd_components(tmp_path, SCHEDULERS[name]()))
    pipe.set_progress_bar_config(disable=True)
    reference = _run(pipe, steps=4, views=2)
    callback = MEt3RCallback(FeatureConsistency(), num_views=2)
    with callback.attach(pipe):
        assert "step" in pipe.scheduler.__dict__
        latents = _run(pipe, callback, steps=4, views=2)
    assert torch.equal(latents, reference)  # guidance_scale=0: bit-identical
    assert [entry["step"] for entry in callback.history] == [0, 1, 2, 3]
    assert all(torch.isfinite(entry["scores"]).all() for entry in callback.history)
    assert "step" not in pipe.scheduler.__dict__
    callback.close()  # idempotent
    assert torch.equal(_run(pipe, steps=4, views=2), reference)


def test_removed_when_pipeline_raises_and_inside_multi_callbacks(sd_pipe):
    callback = MEt3RCallback(FeatureConsistency(), num_views=4)
    multi = MultiPipelineCallbacks([callback, _Raiser()])
    with pytest.raises(RuntimeError, match="boom"), callback.attach(sd_pipe):
        _run(sd_pipe, multi, steps=5)
    assert "step" not in sd_pipe.scheduler.__dict__
    assert [entry["step"] for entry in callback.history] == [0, 1, 2]


class _Raiser:
    tensor_inputs: ClassVar[list[str]] = ["latents"]

    def __call__(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == 2:
            raise RuntimeError("boom")
        return callback_kwargs


def tiny_svd_pipeline():
    """Tiny StableVideoDiffusionPipeline (32x32 frames, (B, F, 4, 16, 16) latents) with SVD's Euler settings."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=16,
        num_attention_heads=(2, 4),
        projection_class_embeddings_input_dim=48,
        addition_time_embed_dim=16,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
        layers_per_block=1,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16, projection_dim=16, num_hidden_layers=1, num_attention_heads=2, image_size=224,
            intermediate_size=16, patch_size=32,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
        sigma_max=700.0, sigma_min=0.002, steps_offset=1, timestep_spacing="leading", timestep_type="continuous",
        use_karras_sigmas=True,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_frames_layout_on_stable_video_diffusion():
    from PIL import Image

    pipe = tiny_svd_pipeline()
    metric = FeatureConsistency()
    callback = MEt3RCallback(metric, layout="frames", pairs="reference", every_n_steps=2)
    with callback.attach(pipe):
        # SVD does not read callback.tensor_inputs: pass callback_on_step_end_tensor_inputs explicitly
        latents = pipe(
            Image.new("RGB", (32, 32), (120, 30, 200)), height=32, width=32, num_frames=3, num_inference_steps=5,
            decode_chunk_size=3, generator=torch.Generator().manual_seed(0), output_type="latent",
            callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs,
        ).frames
    assert latents.shape == (1, 3, 4, 16, 16)
    assert [entry["step"] for entry in callback.history] == [0, 2, 4]
    assert callback.history[0]["pair_scores"].shape == (1, 2) and callback.history[0]["pairs"] == [(0, 1), (0, 2)]
    # Euler's last step lands on its x0 estimate: the final score is the score of the output frames
    with torch.no_grad():
        frames = decode_latents(pipe.vae, latents[0], num_frames=3)
        expected = metric(frames[None], pairs="reference").score
    torch.testing.assert_close(callback.history[-1]["scores"], expected, atol=1e-5, rtol=1e-5)
    assert "step" not in pipe.scheduler.__dict__


def test_grid_layout(sd_pipe):
    callback = MEt3RCallback(FeatureConsistency(), layout="grid:1x2", pairs="all", every_n_steps=3)
    with callback.attach(sd_pipe):
        latents = sd_pipe(
            PROMPT, num_inference_steps=5, height=32, width=64, guidance_scale=1.0, num_images_per_prompt=2,
            generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=callback.tensor_inputs,
        ).images
    assert [entry["step"] for entry in callback.history] == [0, 3, 4]
    assert callback.history[-1]["scores"].shape == (2,)
    with torch.no_grad():
        image = decode_latents(sd_pipe.vae, latents)  # (2, 3, 32, 64): left and right tile
        expected = FeatureConsistency()(torch.stack([image[..., :32], image[..., 32:]], 1)).score
    torch.testing.assert_close(callback.history[-1]["scores"], expected, atol=1e-5, rtol=1e-5)


def test_decode_size_and_decode_fn(sd_pipe):
    seen = []

    def decode_fn(latents):
        seen.append(tuple(latents.shape))
        return decode_latents(sd_pipe.vae, latents, size=16)

    shapes = []
    metric = FeatureConsistency()

    def recording_metric(views, pairs):
        shapes.append(tuple(views.shape))
        return metric(views, pairs)

    callback = MEt3RCallback(recording_metric, num_views=2, decode_fn=decode_fn, every_n_steps=10)
    with callback.attach(sd_pipe):
        _run(sd_pipe, callback, steps=3, views=4)
    assert seen == [(4, 4, 16, 16)] * 2 and shapes == [(2, 2, 3, 16, 16)] * 2
    shapes.clear()
    callback = MEt3RCallback(recording_metric, num_views=2, decode_size=(16, 24), every_n_steps=10)
    with callback.attach(sd_pipe):
        _run(sd_pipe, callback, steps=3, views=4)
    assert shapes == [(2, 2, 3, 16, 24)] * 2


def test_history_rows_and_plot(sd_pipe):
    callback = MEt3RCallback(FeatureConsistency(), num_views=3, pairs="all", every_n_steps=2)
    with callback.attach(sd_pipe):
        _run(sd_pipe, callback, steps=3, views=3)
    rows = callback.history_rows()
    assert [(row["step"], row["sample"]) for row in rows] == [(0, 0), (2, 0)]
    assert set(rows[0]) == {"step", "timestep", "sample", "score", "pair_0_1", "pair_0_2", "pair_1_2"}
    assert rows[1]["score"] == pytest.approx(callback.history[1]["scores"][0].item())
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ax = callback.plot_history()
    assert ax.lines[0].get_xdata().tolist() == [0, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"start": 0.6, "stop": 0.5}, "start"),
        ({"guidance_start": -0.1}, "guidance_start"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"decode_size": (0, 8)}, "decode_size"),
        ({"layout": "tiles"}, "layout"),
        ({"num_views": 1}, "num_views"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MEt3RCallback(FeatureConsistency(), **kwargs)
    with pytest.raises(TypeError, match="metric"):
        MEt3RCallback("met3r")


# ----------------------------------------------------------------------------- guidance


def _final_score(pipe, latents, views_per_sample):
    with torch.no_grad():
        images = decode_latents(pipe.vae, latents)
        return FeatureConsistency()(images.unflatten(0, (-1, views_per_sample))).score


@pytest.mark.parametrize("name", ["ddim", "dpm_multistep"])
def test_guidance_lowers_the_final_score(tmp_path, name):
    pipe = StableDiffusionPipeline(**tiny_sd_components(tmp_path, SCHEDULERS[name]()))
    pipe.set_progress_bar_config(disable=True)
    plain = _final_score(pipe, _run(pipe, steps=8, views=4), 2)
    callback = MEt3RCallback(FeatureConsistency(), num_views=2, guidance_scale=0.3, every_n_steps=4)
    with callback.attach(pipe):
        guided_latents = _run(pipe, callback, steps=8, views=4)
    guided = _final_score(pipe, guided_latents, 2)
    assert torch.isfinite(guided_latents).all()
    assert (guided < plain - 0.02).all(), (plain, guided)
    # the history shows the score falling during guided sampling
    assert (callback.history[-1]["scores"] < callback.history[0]["scores"]).all()


def _toy_metric(**kwargs):
    """met3r_diffusers.testing's stand-in: MEt3R's full call signature (maps, masks) and NaN for empty overlaps."""
    from met3r_diffusers.testing import FeatureConsistencyMetric

    return FeatureConsistencyMetric(**kwargs)


def test_guidance_with_a_pair_without_overlap_stays_finite(sd_pipe):
    """A NaN pair score (empty overlap) must not turn the guided latents into NaN."""
    metric = _toy_metric(shift=1, empty_pairs=[(0, 1)])
    plain = _run(sd_pipe, steps=4, views=3)
    callback = MEt3RCallback(metric, num_views=3, guidance_scale=0.3)
    with callback.attach(sd_pipe):
        guided = _run(sd_pipe, callback, steps=4, views=3)
    assert torch.isfinite(guided).all()
    assert not torch.equal(guided, plain)  # pair (1, 2) still guides
    assert all(torch.isnan(entry["pair_scores"][:, 0]).all() for entry in callback.history)
    # a metric without maps cannot be made NaN-free: its samples with a NaN gradient are left unguided, with a warning
    callback = MEt3RCallback(lambda views, pairs: metric(views, pairs=pairs), num_views=3, guidance_scale=0.3)
    with pytest.warns(UserWarning, match="not finite"), callback.attach(sd_pipe):
        unguided = _run(sd_pipe, callback, steps=4, views=3)
    assert torch.equal(unguided, plain)


def test_accepts_a_loss_and_single_pair_scores_of_shape_b(sd_pipe):
    from met3r_diffusers.loss import MEt3RLoss

    metric = _toy_metric(shift=1)
    callback = MEt3RCallback(MEt3RLoss(metric), num_views=2, every_n_steps=2)
    assert callback.metric is metric

    def flat_pairs(views, pairs):  # a metric reporting (B,) pair scores for its single pair
        output = metric(views, pairs=pairs)
        output.pair_scores = output.pair_scores[:, 0]
        return output

    callback = MEt3RCallback(flat_pairs, num_views=2, every_n_steps=2)
    with callback.attach(sd_pipe):
        _run(sd_pipe, callback, steps=3, views=4)
    assert all(entry["pair_scores"].shape == (2, 1) for entry in callback.history)
    assert [row["pair_0_1"] for row in callback.history_rows()[:2]] == callback.history[0]["pair_scores"][:, 0].tolist()


def test_scores_and_guides_with_the_real_metric_class(sd_pipe):
    """MEt3R itself (plane geometry, random conv features: met3r_diffusers.testing) inside the callback."""
    from met3r_diffusers.testing import tiny_met3r

    metric = tiny_met3r(seed=0)
    plain = _run(sd_pipe, steps=4, views=3)
    callback = MEt3RCallback(metric, num_views=3, pairs="adjacent", every_n_steps=2, guidance_scale=0.3)
    with callback.attach(sd_pipe):
        guided = _run(sd_pipe, callback, steps=4, views=3)
    assert [entry["step"] for entry in callback.history] == [0, 2, 3]
    for entry in callback.history:
        assert entry["pair_scores"].shape == (1, 2) and torch.isfinite(entry["pair_scores"]).all()
        torch.testing.assert_close(entry["scores"], entry["pair_scores"].mean(1))
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)


# ----------------------------------------------------------------------------- composition (one tap per scheduler)


def test_two_callbacks_compose_attached_or_not(sd_pipe):
    scorer = MEt3RCallback(FeatureConsistency(), num_views=2)
    guider = MEt3RCallback(_toy_metric(shift=1), num_views=2, guidance_scale=0.3, every_n_steps=100)
    alone = MEt3RCallback(_toy_metric(shift=1), num_views=2, guidance_scale=0.3, every_n_steps=100)
    with alone.attach(sd_pipe):
        guided_alone = _run(sd_pipe, alone, steps=4, views=4)
    with scorer.attach(sd_pipe), guider.attach(sd_pipe):
        guided = _run(sd_pipe, MultiPipelineCallbacks([scorer, guider]), steps=4, views=4)
    assert [entry["step"] for entry in scorer.history] == [0, 1, 2, 3]
    assert torch.equal(guided, guided_alone)  # the scorer changes nothing; the guider works as alone
    assert "step" not in sd_pipe.scheduler.__dict__
    # auto-attached on their first call (step 0 is missed, with a warning): no KeyError from stacked wrappers
    scorer, guider = MEt3RCallback(FeatureConsistency(), num_views=2), MEt3RCallback(
        _toy_metric(shift=1), num_views=2, guidance_scale=0.3)
    with pytest.warns(UserWarning, match="attach"):
        _run(sd_pipe, MultiPipelineCallbacks([scorer, guider]), steps=4, views=4)
    assert [entry["step"] for entry in scorer.history] == [1, 2, 3]
    assert "step" not in sd_pipe.scheduler.__dict__


def test_attach_and_close_in_any_order(sd_pipe):
    first, second = MEt3RCallback(FeatureConsistency(), num_views=2), MEt3RCallback(FeatureConsistency(), num_views=2)
    first.attach(sd_pipe)
    second.attach(sd_pipe)
    first.close()  # the other stays served
    assert "step" in sd_pipe.scheduler.__dict__
    _run(sd_pipe, MultiPipelineCallbacks([second]), steps=3, views=2)
    assert [entry["step"] for entry in second.history] == [0, 1, 2]
    second.close()
    assert "step" not in sd_pipe.scheduler.__dict__
    # a nested attach of the same callback does not detach the outer block
    callback = MEt3RCallback(FeatureConsistency(), num_views=2, every_n_steps=100)
    with callback.attach(sd_pipe):
        with callback.attach(sd_pipe):
            pass
        assert "step" in sd_pipe.scheduler.__dict__
    assert "step" not in sd_pipe.scheduler.__dict__


@pytest.mark.parametrize("name, value", [
    ("guidance_scale", math.nan), ("guidance_scale", math.inf), ("guidance_scale", -0.1),
    ("max_grad_norm", math.nan), ("max_grad_norm", math.inf), ("max_grad_norm", 0.0),
    ("start", math.nan), ("every_n_steps", 1.5),
])
def test_non_finite_settings_are_refused(name, value):
    with pytest.raises(ValueError, match=name.split("_")[0] if name == "start" else name):
        MEt3RCallback(FeatureConsistency(), **{name: value})


def test_pairs_are_checked_against_num_views_at_construction():
    with pytest.raises(ValueError, match="out of range"):
        MEt3RCallback(FeatureConsistency(), num_views=3, pairs=[(0, 3)])
    with pytest.raises(ValueError, match="integers"):
        MEt3RCallback(FeatureConsistency(), pairs=[(0.9, 1.7)])


def test_bf16_metric_scores_float32_decoded_views(sd_pipe):
    from met3r_diffusers.testing import tiny_met3r

    callback = MEt3RCallback(tiny_met3r().to(torch.bfloat16), num_views=2, every_n_steps=100, guidance_scale=0.1)
    with callback.attach(sd_pipe):
        latents = _run(sd_pipe, callback, steps=2, views=2)
    assert torch.isfinite(latents).all() and torch.isfinite(callback.history[-1]["scores"]).all()


def test_attached_callback_scores_step_zero_of_every_run_in_its_block(sd_pipe):
    callback = MEt3RCallback(FeatureConsistency(), num_views=2, every_n_steps=100)
    with callback.attach(sd_pipe):
        _run(sd_pipe, callback, steps=3, views=2)
        _run(sd_pipe, callback, steps=3, views=2)
    assert [entry["step"] for entry in callback.history] == [0, 2, 0, 2]
    assert "step" not in sd_pipe.scheduler.__dict__


def test_tap_leaves_a_wrapper_put_over_it(sd_pipe):
    callback = MEt3RCallback(FeatureConsistency(), num_views=2)
    callback.attach(sd_pipe)
    ours = sd_pipe.scheduler.step
    calls = []

    def theirs(*args, **kwargs):
        calls.append(1)
        return ours(*args, **kwargs)

    sd_pipe.scheduler.step = theirs
    callback.close()
    assert sd_pipe.scheduler.step is theirs  # not clobbered
    _run(sd_pipe, steps=2, views=2)
    assert len(calls) == 2


def test_frames_decode_fn_gets_the_vae_channel_axis():
    from met3r_diffusers.diffusion import ViewLayout, decode_views

    seen = []
    latents = torch.randn(1, 4, 6, 8, 8)  # (B, C, F, h, w): 4 latent channels, 6 frames

    def decode_fn(z):
        seen.append(tuple(z.shape))
        return torch.zeros(z.shape[0], 3, 16, 16)

    views = decode_views(decode_fn, latents, ViewLayout("frames", 2), latent_channels=4)
    assert seen == [(2, 4, 8, 8)] and views.shape == (1, 2, 3, 16, 16)


def test_a_run_that_stops_early_leaves_no_lasting_wrapper_and_copies_are_clean(sd_pipe):
    import copy
    import gc
    import pickle

    callback = MEt3RCallback(FeatureConsistency(), num_views=3)  # 2 images per prompt: the layout check fails
    with pytest.raises(ValueError, match="num_views"):
        _run(sd_pipe, callback, steps=3, views=2)
    assert "step" in sd_pipe.scheduler.__dict__  # left behind by the interrupted, unattached run ...
    copied = copy.deepcopy(sd_pipe.scheduler)
    restored = pickle.loads(pickle.dumps(sd_pipe.scheduler))
    del callback
    gc.collect()
    reference = _run(sd_pipe, steps=3, views=2)  # ... but it steps plainly and takes itself away
    assert "step" not in sd_pipe.scheduler.__dict__
    assert torch.equal(_run(sd_pipe, steps=3, views=2), reference)
    for scheduler in (copied, restored):  # copies step themselves, not the original
        scheduler.set_timesteps(3)
        sample = torch.randn(1, 4, 4, 4)
        out = scheduler.step(torch.zeros_like(sample), scheduler.timesteps[0], sample).prev_sample
        assert out.shape == sample.shape and "step" not in scheduler.__dict__


def test_copies_of_an_attached_callback_attach_themselves(sd_pipe):
    import copy
    import pickle

    callback = MEt3RCallback(FeatureConsistency(), num_views=2)
    with callback.attach(sd_pipe):
        clone = copy.deepcopy(callback)
        pickle.loads(pickle.dumps(clone))  # picklable (MEt3R and its distance too)
        with pytest.warns(UserWarning, match="attach"):
            _run(sd_pipe, clone, steps=3, views=2)
    assert [entry["step"] for entry in clone.history] == [1, 2]
