"""predict_x0 against the schedulers' own x0 estimates, and VAE decoding."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from test_callbacks import tiny_vae

from met3r_diffusers import predict_x0
from met3r_diffusers.diffusion import decode_latents, is_flow_matching


def _data(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, 6, 6, generator=g)
    noise = torch.randn(batch, 4, 6, 6, generator=g)
    return x0, noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_training_timesteps(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    x0, noise = _data()
    t = torch.tensor([3, 500, 990])
    x_t = scheduler.add_noise(x0, noise, t)
    output = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    torch.testing.assert_close(predict_x0(output, x_t, t, scheduler), x0, atol=2e-4, rtol=1e-4)


def test_scalar_and_batched_timesteps_agree():
    scheduler = DDPMScheduler()
    x0, noise = _data()
    x_t = scheduler.add_noise(x0, noise, torch.tensor([400] * 3))
    scalar = predict_x0(noise, x_t, 400, scheduler)
    batched = predict_x0(noise, x_t, torch.full((3,), 400), scheduler)
    tensor0d = predict_x0(noise, x_t, torch.tensor(400), scheduler)
    torch.testing.assert_close(scalar, batched)
    torch.testing.assert_close(scalar, tensor0d)
    torch.testing.assert_close(scalar, x0, atol=1e-4, rtol=1e-4)


def test_video_latents_broadcast():
    scheduler = DDPMScheduler()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(2, 3, 4, 5, 5, generator=g)
    t = torch.tensor([10, 700])
    x_t = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(predict_x0(noise, x_t, t, scheduler), x0, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_pred_original_sample(prediction_type):
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    x_t, output = _data(batch=2, seed=3)
    t = scheduler.timesteps[4]
    expected = scheduler.step(output, t, x_t).pred_original_sample
    torch.testing.assert_close(predict_x0(output, x_t, t, scheduler), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_sigma_space_fractional_timesteps(prediction_type):
    scheduler = EulerDiscreteScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(7)  # linspace spacing: fractional timesteps
    assert not torch.equal(scheduler.timesteps, scheduler.timesteps.round())
    x_t, output = _data(batch=2, seed=4)
    x_t = x_t * 5
    for i in (0, 3, 6):
        scheduler._step_index = None
        scheduler._begin_index = i
        t = scheduler.timesteps[i]
        expected = scheduler.step(output, t, x_t).pred_original_sample
        torch.testing.assert_close(predict_x0(output, x_t, t, scheduler), expected, atol=1e-4, rtol=1e-4)


def test_euler_add_noise_round_trip():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(20)
    x0, noise = _data(batch=2, seed=5)
    t = scheduler.timesteps[[2, 15]]
    x_t = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(predict_x0(noise, x_t, t, scheduler), x0, atol=1e-4, rtol=1e-4)


def test_dpm_solver_matches_its_data_prediction():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(12)
    x_t, output = _data(batch=2, seed=6)
    scheduler._step_index = 5
    expected = scheduler.convert_model_output(output, sample=x_t)  # x0 for the default dpmsolver++
    t = scheduler.timesteps[5]
    torch.testing.assert_close(predict_x0(output, x_t, t, scheduler), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(8)
    assert is_flow_matching(scheduler)
    x0, noise = _data(batch=2, seed=7)
    t = scheduler.timesteps[[1, 6]]
    x_t = scheduler.scale_noise(x0, t, noise)
    velocity = noise - x0
    torch.testing.assert_close(predict_x0(velocity, x_t, t, scheduler), x0, atol=1e-5, rtol=1e-5)
    # the Euler step with the exact velocity lands on the straight line towards x0
    sigma, sigma_next = scheduler.sigmas[1], scheduler.sigmas[2]
    prev = scheduler.step(velocity[:1], t[0], x_t[:1]).prev_sample
    torch.testing.assert_close(prev, (1 - sigma_next) * x0[:1] + sigma_next * noise[:1], atol=1e-5, rtol=1e-5)
    assert sigma > sigma_next


def test_flow_prediction_on_dpm_solver():
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)
    scheduler.set_timesteps(10)
    x_t, output = _data(batch=1, seed=8)
    scheduler._step_index = 3
    expected = scheduler.convert_model_output(output, sample=x_t)
    t = scheduler.timesteps[3]
    # DPM-Solver rounds flow timesteps to integers: sigma is recovered to within 0.5 / num_train_timesteps
    error = (predict_x0(output, x_t, t, scheduler) - expected).abs().max()
    assert error <= 0.5 / 1000 * output.abs().max() + 1e-6


def test_errors():
    x0, noise = _data()
    scheduler = DDPMScheduler()
    scheduler.register_to_config(prediction_type="bogus")
    with pytest.raises(ValueError, match="prediction_type"):
        predict_x0(noise, x0, 10, scheduler)
    with pytest.raises(ValueError, match="timesteps"):
        predict_x0(noise, x0, torch.tensor([1, 2]), DDPMScheduler())
    with pytest.raises(ValueError, match="timesteps"):
        predict_x0(noise, x0, 5000, DDPMScheduler())
    with pytest.raises(ValueError, match="shape"):
        predict_x0(noise[:1], x0, 10, DDPMScheduler())


def test_decode_latents_scaling_and_shift():
    vae = tiny_vae(scaling_factor=0.5, shift_factor=0.25)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = decode_latents(vae, latents, clamp=False)
        expected = vae.decode(latents / 0.5 + 0.25).sample
    assert images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, expected)
    with torch.no_grad():
        clamped = decode_latents(vae, latents * 20)
    assert clamped.min() >= -1 and clamped.max() <= 1


def test_decode_latents_reduced_size_and_gradient():
    vae = tiny_vae()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    images = decode_latents(vae, latents, size=(16, 12))
    assert images.shape == (2, 3, 16, 12)
    images.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="size"):
        decode_latents(vae, latents, size=(0, 4))
    with pytest.raises(ValueError, match="latents"):
        decode_latents(vae, latents[0])
