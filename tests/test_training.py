"""The fine-tuning script and MEt3REvalHook on tiny random components with the toy stand-in metric (CPU, no network).

The two-process test runs this file itself under `accelerate launch --num_processes 2 --cpu` (gloo, loopback):
see `_hook_worker` at the bottom.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from _training_helpers import FINETUNE_SCRIPT as SCRIPT
from _training_helpers import REPO_ROOT, TOY_METRIC, checkpoint_state, load_script

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from met3r_diffusers.data import make_toy_multiview_dataset
from met3r_diffusers.loss import MEt3RLoss, decode_views, predict_x0
from met3r_diffusers.evaluation import MEt3REvalHook
from met3r_diffusers.training_utils import CHECKPOINT_MARKER, is_complete_checkpoint

train_script = load_script(SCRIPT, "train_met3r_finetune")
from met3r_diffusers.testing import FeatureConsistencyMetric, tiny_training_components  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return make_toy_multiview_dataset(tmp_path_factory.mktemp("toy"), num_scenes=6, num_views=3, resolution=32)


def _args(data_dir, output_dir, *extra):
    return [
        "--tiny_test_model", "--train_data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--train_batch_size", "2", "--met3r_factory", TOY_METRIC, "--met3r_kwargs", '{"shift": 1}',
        "--num_validation_samples", "3", "--validation_inference_steps", "3", "--report_to", "tensorboard",
        *extra,
    ]


def _run(*argv):
    return train_script.main(train_script.parse_args(list(argv)))


def _checkpoint(path):
    return checkpoint_state(path, with_scheduler=True)


def test_lora_run_checkpoint_resume_identical(toy_data, tmp_path, one_thread):
    """4 steps straight == 2 steps + resume from checkpoint-2 + 2 steps (weights, optimizer, scheduler, validation)."""
    common = ("--use_lora", "--checkpointing_steps", "2", "--validation_steps", "2", "--met3r_max_timestep", "700")
    straight = _run(*_args(toy_data, tmp_path / "a", "--max_train_steps", "4", *common))
    assert straight["global_step"] == 4
    assert [r["step"] for r in straight["validation"]] == [2, 4]
    assert sorted(os.listdir(tmp_path / "a")) == [
        "checkpoint-2", "checkpoint-4", "logs", "met3r_validation.jsonl", "pytorch_lora_weights.safetensors"
    ]
    lines = [json.loads(line) for line in (tmp_path / "a" / "met3r_validation.jsonl").read_text().splitlines()]
    assert [line["num_samples"] for line in lines] == [3, 3] and all(0 < line["score"] < 2 for line in lines)
    lora = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    assert lora and all("lora" in key for key in lora)
    marker = json.loads((tmp_path / "a" / "checkpoint-4" / "checkpoint_complete.json").read_text())
    assert marker["kind"] == "train_met3r_finetune"  # the reward script refuses to resume it

    AcceleratorState._reset_state(True)
    _run(*_args(toy_data, tmp_path / "b", "--max_train_steps", "2", *common))
    AcceleratorState._reset_state(True)
    resumed = _run(*_args(toy_data, tmp_path / "b", "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                          *common))
    assert resumed["global_step"] == 4 and [r["step"] for r in resumed["validation"]] == [4]

    expected, actual = _checkpoint(tmp_path / "a" / "checkpoint-4"), _checkpoint(tmp_path / "b" / "checkpoint-4")
    assert expected.keys() == actual.keys() and any(".lora" in k for k in expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    assert resumed["validation"][-1]["score"] == straight["validation"][-1]["score"]
    # training did move the LoRA weights away from the checkpoint-2 state
    halfway = _checkpoint(tmp_path / "a" / "checkpoint-2")
    assert any(not torch.equal(halfway[k], expected[k]) for k in expected if ".lora_B" in k)


@pytest.mark.parametrize(
    "extra, partial_steps",
    [
        # the checkpoint is not a validation step (validation used to shift the global RNG, and resume did too)
        (("--validation_steps", "3"), 2),
        # mid-epoch with gradient accumulation: 3 batches per epoch, 2 per update; checkpoint-1 skips 2 batches
        (("--gradient_accumulation_steps", "2", "--num_validation_samples", "0"), 1),
        # the epoch boundary, a random pair subset per step, two loader workers
        (("--met3r_pairs", "all", "--met3r_num_pairs", "1", "--dataloader_num_workers", "2",
          "--num_validation_samples", "0"), 3),
    ],
    ids=["validation-elsewhere", "grad-accumulation-mid-epoch", "epoch-boundary-pair-subset-workers"],
)
def test_resume_is_bit_exact(toy_data, tmp_path, one_thread, extra, partial_steps):
    """N steps straight == `partial_steps` steps + resume from latest + the rest: weights, losses, validation."""
    common = ("--use_lora", "--checkpointing_steps", str(partial_steps), "--met3r_max_timestep", "700",
              "--validation_inference_steps", "2", "--report_to", "none", *extra)
    straight = _run(*_args(toy_data, tmp_path / "a", "--max_train_steps", "4", *common))
    AcceleratorState._reset_state(True)
    _run(*_args(toy_data, tmp_path / "b", "--max_train_steps", str(partial_steps), *common))
    AcceleratorState._reset_state(True)
    resumed = _run(*_args(toy_data, tmp_path / "b", "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                          *common))
    assert straight["global_step"] == resumed["global_step"] == 4
    expected = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    actual = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert expected.keys() == actual.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)
    # the mean of every step's diffusion loss (the recent losses travel in the checkpoint): equal only if each is
    assert resumed["final_diffusion_loss"] == straight["final_diffusion_loss"]
    after = [(r["step"], r["score"]) for r in straight["validation"] if r["step"] > partial_steps]
    assert [(r["step"], r["score"]) for r in resumed["validation"]] == after


def test_validation_does_not_change_training(toy_data, tmp_path, one_thread):
    """Validating every step leaves the trained weights bit-identical to validating only at the end."""
    common = ("--use_lora", "--max_train_steps", "2", "--validation_inference_steps", "2", "--report_to", "none")
    _run(*_args(toy_data, tmp_path / "a", "--validation_steps", "1", *common))
    AcceleratorState._reset_state(True)
    _run(*_args(toy_data, tmp_path / "b", "--validation_steps", "0", *common))
    expected = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    actual = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_full_finetune_each_prediction_type(toy_data, tmp_path, prediction_type):
    result = _run(*_args(toy_data, tmp_path, "--max_train_steps", "1", "--prediction_type", prediction_type,
                         "--num_validation_samples", "0", "--report_to", "none", "--met3r_weight", "1.0"))
    assert result["global_step"] == 1 and result["validation"] == []
    assert (tmp_path / "unet" / "config.json").exists()
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["num_class_embeds"] >= 3


def test_script_with_the_real_metric_class(toy_data, tmp_path):
    """The script's default factory type: MEt3R itself (met3r_diffusers.testing: plane geometry, random conv features)."""
    factory = "met3r_diffusers.testing:tiny_met3r"
    args = _args(toy_data, tmp_path, "--max_train_steps", "2", "--validation_steps", "2", "--use_lora",
                 "--met3r_weight", "1.0")
    args[args.index(TOY_METRIC)] = factory
    args[args.index('{"shift": 1}')] = '{"seed": 0}'
    result = _run(*args)
    assert result["global_step"] == 2
    (validation,) = result["validation"]
    assert validation["num_samples"] == 3 and 0 < validation["score"] < 2


def test_regulariser_gradient_reaches_lora_parameters(toy_data):
    """λ·MEt3R alone gives finite, non-zero gradients on the LoRA weights, none on the frozen base or the metric."""
    from peft import LoraConfig

    components = tiny_training_components(32, 3, seed=0, prediction_type="epsilon")
    unet, vae, scheduler = components["unet"], components["vae"], components["scheduler"]
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=train_script.LORA_TARGET_MODULES))
    vae.requires_grad_(False)
    metric = FeatureConsistencyMetric(shift=1)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([200] * 3 + [900] * 3)
    noisy = scheduler.add_noise(latents, torch.randn(6, 4, 8, 8, generator=generator), timesteps)
    context = torch.randn(6, 5, 32, generator=generator)
    model_pred = unet(noisy, timesteps, context, class_labels=torch.arange(3).repeat(2)).sample
    views = decode_views(vae, predict_x0(model_pred, noisy, timesteps, scheduler), num_views=3)
    loss = MEt3RLoss(metric, max_timestep=500)(views, timesteps=timesteps[::3])
    loss.backward()

    lora_grads = {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads.values())
    assert sum(g.abs().sum() for n, g in lora_grads.items() if "lora_B" in n) > 0
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)
    assert all(p.grad is None for p in metric.parameters())


def _write_views(scene_dir, sizes):
    from PIL import Image

    scene_dir.mkdir(parents=True)
    for v, size in enumerate(sizes):
        Image.new("RGB", size, (v * 40, 90, 160)).save(scene_dir / f"view_{v}.png")


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--met3r_weight", "-0.5"), "met3r_weight"),
        (("--prediction_type", "flow"), "prediction_type"),
        (("--train_data_dir", "/nonexistent/scenes"), "train_data_dir"),
        (("--met3r_kwargs", "{shift: 1}"), "met3r_kwargs"),
        (("--resume_from_checkpoint", "checkpoint-7"), "no such checkpoint"),
        (("--met3r_weight", "nan"), r"--met3r_weight \(λ\) must be finite, got nan"),
        (("--learning_rate", "inf"), "--learning_rate must be finite"),
        (("--max_grad_norm", "inf"), "--max_grad_norm must be finite"),
        (("--adam_epsilon", "nan"), "--adam_epsilon must be finite"),
        (("--adam_beta2", "1.0"), r"--adam_beta2 must be in \[0, 1\)"),
        (("--met3r_kwargs", "[1, 2]"), "--met3r_kwargs must be a JSON object"),
        (("--met3r_kwargs", '{"shfit": 1}'), "--met3r_kwargs do not fit --met3r_factory.*shfit"),
        (("--met3r_factory", "no_such_module:build"), "--met3r_factory 'no_such_module:build': cannot load"),
        (("--met3r_factory", "met3r_diffusers.testing:NoSuchMetric"), "--met3r_factory.*no callable 'NoSuchMetric'"),
        (("--met3r_factory", "/nonexistent/metric.py:build"), "--met3r_factory.*no such file"),
        (("--met3r_factory", "met3r_diffusers.testing"), "--met3r_factory must look like 'module:callable'"),
        (("--resolution", "0"), "--resolution must be >= 1"),
        (("--resolution", "30"), "--resolution: 30x30 is not a multiple of the VAE's down-sampling factor 4"),
        (("--met3r_resolution", "0"), "--met3r_resolution must be >= 1"),
        (("--met3r_resolution", "18"), "--met3r_resolution 18 is not a multiple"),
        (("--num_views", "1"), "--num_views must be >= 2"),
        (("--checkpoints_total_limit", "0"), "--checkpoints_total_limit must be >= 1"),
        (("--lr_scheduler", "cosine_annealing"), "--lr_scheduler must be one of"),
        (("--mixed_precision", "fp16"), "--mixed_precision fp16 needs a GPU"),
    ],
)
def test_bad_configuration_fails_before_training(toy_data, tmp_path, monkeypatch, extra, match):
    if "fp16" in extra and torch.cuda.is_available():
        pytest.skip("fp16 is refused on the CPU only")
    monkeypatch.setattr(train_script, "tiny_training_components", lambda *a, **k: pytest.fail("components were built"))
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        _run(*_args(toy_data, output_dir, "--max_train_steps", "1", *extra))
    assert not (output_dir / "checkpoint-1").exists() and not (output_dir / "met3r_validation.jsonl").exists()
    assert not output_dir.exists()


def test_incomplete_checkpoint_fails_before_training(toy_data, tmp_path, monkeypatch):
    """An explicit checkpoint without its completion marker (a killed save) is refused before any model is built."""
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "model.safetensors").write_bytes(b"torn")
    monkeypatch.setattr(train_script, "tiny_training_components", lambda *a, **k: pytest.fail("components were built"))
    with pytest.raises(ValueError, match="resume_from_checkpoint 'checkpoint-3'.*incomplete checkpoint"):
        _run(*_args(toy_data, tmp_path, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-3"))


def test_mismatched_view_sizes_fail_before_any_model_is_built(tmp_path, monkeypatch):
    _write_views(tmp_path / "data" / "scene_0", [(32, 32), (32, 32)])
    _write_views(tmp_path / "data" / "scene_1", [(32, 32), (48, 32)])
    monkeypatch.setattr(train_script, "tiny_training_components", lambda *a, **k: pytest.fail("components were built"))
    with pytest.raises(ValueError, match="scene_1.*mismatched sizes"):
        _run(*_args(tmp_path / "data", tmp_path / "out", "--max_train_steps", "1"))
    assert not (tmp_path / "out").exists()


def test_bad_configuration_from_the_command_line(toy_data, tmp_path):
    """The script itself exits non-zero with the message, in seconds (no model is built)."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *_args(toy_data, tmp_path, "--met3r_weight", "-1")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode != 0
    assert "--met3r_weight (λ) must be >= 0, got -1.0" in result.stderr
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- evaluation hook


def _hook_sample_fn(inputs, generators):
    """Deterministic 'sampler': views from each input's generator (b, 3 views, 3, 16, 16)."""
    views = [torch.rand(3, 3, 16, 16, generator=g) * 2 - 1 + 0.1 * value for value, g in zip(inputs, generators)]
    return torch.stack(views)


def _run_hook(output_dir=None):
    accelerator = Accelerator(cpu=True, log_with="tensorboard" if output_dir else None, project_dir=output_dir)
    if output_dir:
        accelerator.init_trackers("hook")
    metric = FeatureConsistencyMetric(shift=1, empty_pairs=[(1, 2)])
    hook = MEt3REvalHook(accelerator, every_n_steps=5, sample_fn=_hook_sample_fn, metric=metric,
                         inputs=[0.0, 1.0, 2.0, 3.0, 4.0], pairs="all", batch_size=2, seed=3)
    assert hook(4) is None
    results = hook(10)
    accelerator.end_training()
    return accelerator, results


def _summary(results):
    return {
        "score": results["score"],
        "pair_scores": results["pair_scores"],
        "scores": results["scores"].tolist(),
        "num_samples": results["num_samples"],
    }


def test_eval_hook_single_process(tmp_path):
    _, results = _run_hook(str(tmp_path))
    metric = FeatureConsistencyMetric(shift=1, empty_pairs=[(1, 2)])
    expected = metric(_hook_sample_fn([0.0, 1.0, 2.0, 3.0, 4.0],
                                      [torch.Generator().manual_seed(3 + k) for k in range(5)]), pairs="all")
    torch.testing.assert_close(results["scores"], expected.score)
    assert results["num_samples"] == 5 and list(results["pair_scores"]) == ["0-1", "0-2", "1-2"]
    assert results["pair_scores"]["1-2"] != results["pair_scores"]["1-2"]  # NaN: empty overlap for every sample
    assert results["score"] == pytest.approx(float(expected.score.mean()), rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "hook")).Reload()
    assert {"met3r/score", "met3r/pair_0-1", "met3r/overlap"} <= set(events.Tags()["scalars"])
    assert events.Scalars("met3r/score")[0].step == 10
    image = events.Images("met3r/sample_0")[0]
    assert (image.width, image.height) == (3 * 16, 2 * 16)  # 3 views above, 3 pair heatmaps below


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_eval_hook_two_processes_match_single_process(tmp_path):
    """Two gloo processes on the CPU gather exactly the single-process numbers (5 inputs: uneven shards, padding).

    `accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up, so the two processes
    are started through Accelerate's torchrun launcher (`--multi_gpu`) with ACCELERATE_USE_CPU=true: loopback only.
    """
    out = tmp_path / "two.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               ACCELERATE_USE_CPU="true", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), __file__, str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["num_processes"] == 2
    _, results = _run_hook()
    single = _summary(results)
    assert two["num_samples"] == single["num_samples"] == 5
    torch.testing.assert_close(torch.tensor(two["scores"]), torch.tensor(single["scores"]), rtol=0, atol=0)
    assert two["score"] == single["score"]
    assert json.dumps(two["pair_scores"]) == json.dumps(single["pair_scores"])


@pytest.mark.slow
def test_script_under_two_processes(toy_data, tmp_path):
    """DDP (gloo) run of the script with LoRA, gradient accumulation, a checkpoint and validation on 3 inputs."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), str(SCRIPT),
               *_args(toy_data, tmp_path, "--use_lora", "--train_batch_size", "1", "--gradient_accumulation_steps",
                      "2", "--max_train_steps", "3", "--checkpointing_steps", "2", "--validation_steps", "2")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()
    # both processes' random states are in the checkpoint, and the main process marked it complete after them
    marker = json.loads((tmp_path / "checkpoint-2" / CHECKPOINT_MARKER).read_text())
    assert marker["global_step"] == 2 and {"random_states_0.pkl", "random_states_1.pkl"} <= set(marker["files"])
    assert is_complete_checkpoint(tmp_path / "checkpoint-2")
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    lines = [json.loads(line) for line in (tmp_path / "met3r_validation.jsonl").read_text().splitlines()]
    assert [(line["step"], line["num_samples"]) for line in lines] == [(2, 3), (3, 3)]


def _hook_worker(out_path):
    accelerator, results = _run_hook()
    if accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"num_processes": accelerator.num_processes, **_summary(results)}, f)


if __name__ == "__main__":
    _hook_worker(sys.argv[1])


def test_resuming_at_the_last_step_trains_no_further(toy_data, tmp_path):
    common = ("--max_train_steps", "1", "--checkpointing_steps", "1", "--num_validation_samples", "0")
    assert _run(*_args(toy_data, tmp_path, *common))["global_step"] == 1
    result = _run(*_args(toy_data, tmp_path, *common, "--resume_from_checkpoint", "latest"))
    assert result["global_step"] == 1 and not (tmp_path / "checkpoint-2").exists()


def test_reward_resolution_must_fit_the_vae(tmp_path):
    reward_script = load_script(REPO_ROOT / "training" / "train_met3r_reward.py", "train_met3r_reward_check")
    (tmp_path / "p.txt").write_text("a chair\n")
    args = reward_script.parse_args([
        "--tiny_test_model", "--prompts_file", str(tmp_path / "p.txt"), "--num_views", "2", "--resolution", "32",
        "--reward_resolution", "33", "--met3r_factory", TOY_METRIC, "--output_dir", str(tmp_path / "o"),
    ])
    with pytest.raises(ValueError, match="reward_resolution 33"):
        reward_script.main(args)
