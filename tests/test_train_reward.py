"""The reward fine-tuning script (DRaFT-K) on tiny random components with the toy stand-in metric (CPU, no network)."""
from __future__ import annotations

import json

import pytest
import torch
from _training_helpers import REWARD_SCRIPT, TOY_METRIC, checkpoint_state, load_script

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from met3r_diffusers.data import make_toy_multiview_dataset
from met3r_diffusers.rewards import MEt3RReward
from met3r_diffusers.testing import FeatureConsistencyMetric, tiny_unet

train_script = load_script(REWARD_SCRIPT, "train_met3r_reward")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return make_toy_multiview_dataset(tmp_path_factory.mktemp("toy"), num_scenes=4, num_views=2, resolution=16)


def _args(data_dir, output_dir, *extra):
    return [
        "--tiny_test_model", "--train_data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--train_batch_size", "2", "--num_inference_steps", "2", "--truncation_steps", "2", "--cfg_scale", "2",
        "--met3r_factory", TOY_METRIC, "--met3r_kwargs", '{"shift": 1}', "--num_validation_prompts", "2",
        "--learning_rate", "1e-3", "--report_to", "none", *extra,
    ]


def _run(*argv):
    return train_script.main(train_script.parse_args(list(argv)))


def _logs(history):
    return [{k: v for k, v in row.items() if k != "step_seconds"} for row in history]


def test_lora_run_kl_and_bit_exact_resume(toy_data, tmp_path):
    """2 steps straight == 1 step + resume + 1 step (weights, optimizer moments, logs, validation); KL 0 -> > 0."""
    common = ("--use_lora", "--checkpointing_steps", "1", "--validation_steps", "2", "--kl_weight", "1",
              "--diffusion_loss_weight", "1")
    straight = _run(*_args(toy_data, tmp_path / "a", "--max_train_steps", "2", "--report_to", "tensorboard",
                           *common))
    history = straight["history"]
    assert straight["global_step"] == 2 and [row["step"] for row in history] == [1, 2]
    assert history[0]["kl"] == 0.0 and all(row["kl"] > 0 for row in history[1:])  # base == fine-tuned at step 0
    assert all(-2 < row["reward"] < 0 and row["diffusion_loss"] > 0 for row in history)
    assert {"stats/contrast", "stats/saturation", "stats/mean_red", "empty_pairs"} <= set(history[0])
    assert [r["step"] for r in straight["validation"]] == [2]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "checkpoint-1", "checkpoint-2", "logs", "met3r_validation.jsonl", "pytorch_lora_weights.safetensors"]
    lora = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    lora_b = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at 0: the adapters were trained
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = (tmp_path / "a" / "logs").iterdir()
    tags = set(EventAccumulator(str(events_dir)).Reload().Tags()["scalars"])
    assert {"reward", "kl", "stats/contrast", "met3r/score"} <= tags

    AcceleratorState._reset_state(True)
    _run(*_args(toy_data, tmp_path / "b", "--max_train_steps", "1", *common))
    AcceleratorState._reset_state(True)
    resumed = _run(*_args(toy_data, tmp_path / "b", "--max_train_steps", "2", "--resume_from_checkpoint", "latest",
                          *common))
    assert [row["step"] for row in resumed["history"]] == [2]
    assert _logs(resumed["history"]) == _logs(history[1:])
    expected = checkpoint_state(tmp_path / "a" / "checkpoint-2")
    actual = checkpoint_state(tmp_path / "b" / "checkpoint-2")
    assert expected.keys() == actual.keys() and any(".lora" in k for k in expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    assert resumed["validation"][-1]["score"] == straight["validation"][-1]["score"]


def test_full_finetune_from_a_prompts_file(tmp_path):
    """No dataset: prompts from a file; the full UNet's KL against its frozen copy is 0 at step 1, then > 0."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red sphere\n\na blue box\n")
    result = _run("--tiny_test_model", "--prompts_file", str(prompts), "--num_views", "2", "--resolution", "16",
                  "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--train_batch_size", "2",
                  "--num_inference_steps", "2", "--truncation_steps", "1", "--kl_weight", "1",
                  "--met3r_factory", TOY_METRIC, "--num_validation_prompts", "0", "--report_to", "none",
                  "--learning_rate", "1e-3")
    kl = [row["kl"] for row in result["history"]]
    assert kl[0] == 0.0 and kl[1] > 0
    assert json.loads((tmp_path / "out" / "unet" / "config.json").read_text())["sample_size"] == 4


def test_samples_without_overlap_are_counted_and_harmless(toy_data, tmp_path):
    """Every pair empty: reward 0 and no gradient from it, counted in the logs; weights stay finite."""
    result = _run(*_args(toy_data, tmp_path, "--max_train_steps", "1", "--num_validation_prompts", "0",
                         "--met3r_kwargs", '{"shift": 1, "empty_pairs": [[0, 1]]}', "--kl_weight", "1"))
    (row,) = result["history"]
    assert row["empty_pairs"] == 2 and row["empty_samples"] == 2 and row["reward"] == 0.0
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")).values())


def _tiny_sampler(truncation_steps, empty_pairs=()):
    """A tiny UNet through sample_latents (3 DDIM steps, CFG 2) and a decoder into 3 views scored by the toy metric."""
    from diffusers import DDIMScheduler

    unet = tiny_unet(sample_size=8)
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(3)
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(3, 2, 16, generator=generator)
    denoise = train_script.guided_denoiser(unet, scheduler, context, torch.zeros_like(context), None, 2.0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    final, kl, kept = train_script.sample_latents(denoise, scheduler, latents, truncation_steps)
    for prediction in kept:
        prediction.retain_grad()
    views = torch.tanh(torch.nn.functional.interpolate(final[:, :3], size=16))[None]  # (1, 3 views, 3, 16, 16)
    reward = MEt3RReward(FeatureConsistencyMetric(shift=1, empty_pairs=empty_pairs), differentiable=True)
    rewards, info = reward(views)
    torch.where(info["valid_samples"], rewards, torch.zeros_like(rewards)).sum().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return kept, grads, kl


def test_gradient_reaches_the_earlier_denoiser_calls():
    """K = 3 of 3 calls keep their graph: each gets a gradient, the parameters' gradient differs from K = 1's."""
    kept, grads, kl = _tiny_sampler(3)
    assert len(kept) == 3 and float(kl) == 0.0
    for prediction in kept:
        assert prediction.grad is not None and torch.isfinite(prediction.grad).all()
        assert prediction.grad.abs().sum() > 0
    kept_one, grads_one, _ = _tiny_sampler(1)
    assert len(kept_one) == 1 and grads.keys() == grads_one.keys()
    assert any(not torch.allclose(grads[n], grads_one[n]) for n in grads)


@pytest.mark.parametrize("empty_pairs", [[(0, 1)], [(0, 1), (1, 2)]])
def test_gradients_are_finite_when_pairs_have_no_overlap(empty_pairs):
    kept, grads, _ = _tiny_sampler(2, empty_pairs)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert all(torch.isfinite(p.grad).all() for p in kept)
    total = sum(float(g.abs().sum()) for g in grads.values())
    assert (total > 0) == (len(empty_pairs) == 1)  # no overlap anywhere: no gradient at all


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--truncation_steps", "4"), "truncation_steps 4 exceeds"),
        (("--resume_from_checkpoint", "checkpoint-7"), "no such checkpoint"),
        (("--kl_weight", "-1"), "kl_weight"),
        (("--cfg_scale", "0.5"), "cfg_scale"),
        (("--met3r_kwargs", "{shift: 1}"), "met3r_kwargs"),
        (("--train_data_dir", "/nonexistent/scenes"), "train_data_dir"),
        (("--prompts_file", "/nonexistent/prompts.txt"), "prompts_file"),
    ],
)
def test_bad_configuration_fails_before_training(toy_data, tmp_path, monkeypatch, extra, match):
    monkeypatch.setattr(train_script, "tiny_training_components", lambda *a, **k: pytest.fail("components were built"))
    with pytest.raises(ValueError, match=match):
        _run(*_args(toy_data, tmp_path / "out", "--max_train_steps", "1", *extra))
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_diffusion_loss_needs_data_and_prompts_need_a_source(tmp_path):
    with pytest.raises(ValueError, match="diffusion_loss_weight"):
        train_script.parse_args(["--tiny_test_model", "--prompts_file", __file__, "--num_views", "2",
                                 "--diffusion_loss_weight", "1"])
    with pytest.raises(ValueError, match="--prompts_file or --train_data_dir"):
        train_script.parse_args(["--tiny_test_model", "--num_views", "2"])


@pytest.mark.slow
def test_a_checkpoint_of_the_other_script_is_refused(toy_data, tmp_path):
    """The fine-tuning script's checkpoint (same LoRA names) is not resumed by the reward script."""
    _run(*_args(toy_data, tmp_path, "--use_lora", "--checkpointing_steps", "1", "--max_train_steps", "1"))
    marker_path = tmp_path / "checkpoint-1" / "checkpoint_complete.json"
    marker = json.loads(marker_path.read_text())
    assert marker["kind"] == "train_met3r_reward"
    marker["kind"] = "train_met3r_finetune"
    marker_path.write_text(json.dumps(marker))
    AcceleratorState._reset_state(True)
    with pytest.raises(ValueError, match="written by 'train_met3r_finetune', not by 'train_met3r_reward'"):
        _run(*_args(toy_data, tmp_path, "--use_lora", "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
