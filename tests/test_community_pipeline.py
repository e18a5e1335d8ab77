"""The single-file community pipeline pipelines/met3r_guided_multiview.py: loading by path, exact guidance."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from test_callbacks import FeatureConsistency, tiny_sd_components

from met3r_diffusers.callbacks import MEt3RCallback
from met3r_diffusers.diffusion import sample_coefficients, predict_x0

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "met3r_guided_multiview.py"


def _pipeline_class():
    spec = importlib.util.spec_from_file_location("met3r_guided_multiview", PIPELINE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.MEt3RGuidedMultiViewPipeline


def _from_components(tmp_path, scheduler=None):
    components = tiny_sd_components(tmp_path, scheduler)
    keep = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    pipe = _pipeline_class()(**{name: components[name] for name in keep})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, seed=0, **kwargs):
    kwargs = {"num_views": 2, "num_inference_steps": 6, "height": 32, "width": 32, "guidance_scale": 1.0, **kwargs}
    return pipe("a chair", generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs)


def _score(images: torch.Tensor, num_views: int = 2) -> torch.Tensor:
    return FeatureConsistency()(images.unflatten(0, (-1, num_views)) * 2 - 1).score


def test_loads_by_path_and_guidance_lowers_the_score(tmp_path):
    StableDiffusionPipeline(**tiny_sd_components(tmp_path)).save_pretrained(tmp_path / "model")
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "model", custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True
    )
    assert type(pipe).__name__ == "MEt3RGuidedMultiViewPipeline"
    pipe.set_progress_bar_config(disable=True)
    plain = _sample(pipe, num_samples_per_prompt=2)
    assert plain.images.shape == (4, 3, 32, 32) and plain.met3r_scores == []
    guided = _sample(pipe, num_samples_per_prompt=2, metric=FeatureConsistency(), met3r_guidance_scale=100.0)
    assert [entry["step"] for entry in guided.met3r_scores] == list(range(6))
    assert guided.met3r_scores[0]["scores"].shape == (2,)
    plain_score, guided_score = _score(plain.images), _score(guided.images)
    assert (guided_score < plain_score - 0.05).all(), (plain_score, guided_score)
    # the same components built directly give the same unguided samples (StableDiffusionPipeline rewrote the
    # saved scheduler's steps_offset, so reuse the loaded scheduler config)
    direct = _from_components(tmp_path, DDIMScheduler.from_config(pipe.scheduler.config))
    torch.testing.assert_close(_sample(direct, num_samples_per_prompt=2).images, plain.images)


def test_window_every_n_steps_and_classifier_free_guidance(tmp_path):
    pipe = _from_components(tmp_path)
    out = _sample(
        pipe, metric=FeatureConsistency(), met3r_guidance_scale=10.0, met3r_guidance_start=0.3,
        met3r_every_n_steps=2, guidance_scale=3.0, negative_prompt="blurry",
    )
    assert [entry["step"] for entry in out.met3r_scores] == [2, 4]
    assert torch.isfinite(out.images).all()


def test_gradient_checkpointing_and_decode_size(tmp_path):
    pipe = _from_components(tmp_path)
    kwargs = {"metric": FeatureConsistency(), "met3r_guidance_scale": 50.0, "num_inference_steps": 3}
    reference = _sample(pipe, **kwargs)
    checkpointed = _sample(pipe, gradient_checkpointing=True, **kwargs)
    torch.testing.assert_close(checkpointed.images, reference.images, atol=1e-5, rtol=1e-5)
    assert not pipe.unet.is_gradient_checkpointing and not pipe.vae.is_gradient_checkpointing  # restored
    shapes = []

    def metric(views, pairs):
        shapes.append(tuple(views.shape))
        return FeatureConsistency()(views, pairs)

    _sample(pipe, metric=metric, met3r_guidance_scale=1.0, met3r_decode_size=16, num_inference_steps=2)
    assert shapes == [(1, 2, 3, 16, 16)] * 2


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda: DDIMScheduler(clip_sample=False),
        lambda: DDIMScheduler(clip_sample=False, prediction_type="v_prediction"),
        lambda: DDIMScheduler(clip_sample=False, prediction_type="sample"),
        lambda: EulerDiscreteScheduler(prediction_type="v_prediction"),
        lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    ],
    ids=["ddim-eps", "ddim-v", "ddim-sample", "euler-v", "flow"],
)
def test_guided_output_is_classifier_guidance(tmp_path, make_scheduler):
    """Whatever the prediction type, the corrected output implies eps' = eps + scale * sigma_t * grad."""
    pipe = _from_components(tmp_path, make_scheduler())
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[3]
    g = torch.Generator().manual_seed(0)
    x, output, grad = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    guided = pipe._guided_output(output, grad, t, 0.7)
    alpha, sigma = (float(c[0]) for c in sample_coefficients(pipe.scheduler, t))

    def implied_eps(model_output):
        return (x - alpha * predict_x0(model_output, x, t, pipe.scheduler)) / sigma

    torch.testing.assert_close(implied_eps(guided), implied_eps(output) + 0.7 * sigma * grad, atol=1e-4, rtol=1e-4)


def test_step_end_callback_inside_the_pipeline(tmp_path):
    pipe = _from_components(tmp_path)
    callback = MEt3RCallback(FeatureConsistency(), num_views=2, every_n_steps=2)
    with callback.attach(pipe):
        out = _sample(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)
    assert [entry["step"] for entry in callback.history] == [0, 2, 4, 5]
    torch.testing.assert_close(out.images, _sample(pipe).images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_views": 1}, "num_views"),
        ({"met3r_guidance_scale": 1.0}, "metric"),
        ({"met3r_guidance_scale": -1.0}, "met3r_guidance_scale"),
        ({"met3r_guidance_start": 0.8, "met3r_guidance_stop": 0.2}, "met3r_guidance_start"),
        ({"met3r_every_n_steps": 0}, "met3r_every_n_steps"),
        ({"callback_on_step_end_tensor_inputs": ["prompt_embeds"]}, "callback_on_step_end_tensor_inputs"),
        ({"prompt_embeds": torch.zeros(3, 16, 16)}, "prompt"),
        ({"met3r_guidance_scale": float("nan")}, "met3r_guidance_scale"),
        ({"met3r_guidance_scale": float("inf")}, "met3r_guidance_scale"),
        ({"met3r_max_grad_norm": float("nan")}, "met3r_max_grad_norm"),
        ({"met3r_guidance_start": float("nan")}, "met3r_guidance_start"),
        ({"met3r_every_n_steps": 1.5}, "met3r_every_n_steps"),
    ],
)
def test_argument_errors(tmp_path, kwargs, match):
    pipe = _from_components(tmp_path)
    with pytest.raises(ValueError, match=match):
        _sample(pipe, **kwargs)


def test_guidance_with_a_pair_without_overlap_stays_finite(tmp_path):
    from test_callbacks import _toy_metric

    pipe = _from_components(tmp_path)
    metric = _toy_metric(shift=1, empty_pairs=[(0, 1)])
    plain = _sample(pipe, num_views=3, num_inference_steps=3)
    guided = _sample(pipe, num_views=3, num_inference_steps=3, metric=metric, met3r_guidance_scale=50.0)
    assert torch.isfinite(guided.images).all()
    assert not torch.equal(guided.images, plain.images)  # pair (1, 2) still guides
    # without maps the NaN gradient cannot be avoided: the sample is left unguided
    unguided = _sample(pipe, num_views=3, num_inference_steps=3, met3r_guidance_scale=50.0,
                       metric=lambda views, pairs: metric(views, pairs=pairs))
    torch.testing.assert_close(unguided.images, plain.images)
