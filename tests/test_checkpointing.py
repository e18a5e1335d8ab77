"""Kill-safe checkpoints and bit-exact resume (met3r_diffusers.training_utils and the fine-tuning script).

The kill tests run this file as a program (`_kill_worker` at the bottom): it imports the script once and forks one
real training process per run; a killed run SIGKILLs itself just before the k-th write, rename or delete of a
checkpoint file during its save at step 2, then a fresh process resumes from `latest`, and its final weights, logged
losses and validation score are compared bit for bit with an uninterrupted run.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_helpers import FINETUNE_SCRIPT as SCRIPT
from _training_helpers import TOY_METRIC, load_script

from met3r_diffusers.training_utils import (
    CHECKPOINT_MARKER,
    checkpoint_step,
    epoch_batches,
    epoch_dataloader,
    find_checkpoint,
    is_complete_checkpoint,
    list_checkpoints,
    load_checkpoint,
    preserved_rng_state,
    resume_position,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _accelerator():
    """A CPU accelerator with a prepared linear model, optimizer and LR scheduler."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer


def _train_step(model, optimizer):
    model(torch.randn(4, 3)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _names(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# ----------------------------------------------------------------------------- save / find / load


def test_save_checkpoint_marker_rotation_and_foreign_folders(tmp_path):
    accelerator, model, optimizer = _accelerator()
    (tmp_path / "checkpoint-best").mkdir(parents=True)       # not checkpoint-<int>: never touched
    (tmp_path / "checkpoint-0").mkdir()                       # incomplete (no marker): skipped, never deleted
    (tmp_path / "checkpoint-9").write_text("a file, not a folder")
    for step in (1, 2, 3):
        _train_step(model, optimizer)
        path = save_checkpoint(accelerator, tmp_path, step, total_limit=2, extra={"losses": [0.5, step]})
        assert path == tmp_path / f"checkpoint-{step}" and is_complete_checkpoint(path)
    assert _names(tmp_path) == ["checkpoint-0", "checkpoint-2", "checkpoint-3", "checkpoint-9", "checkpoint-best"]
    marker = json.loads((tmp_path / "checkpoint-3" / CHECKPOINT_MARKER).read_text())
    assert marker["global_step"] == 3 and marker["extra"] == {"losses": [0.5, 3]}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(marker["files"])
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [2, 3]
    assert checkpoint_step("checkpoint-best") is None and checkpoint_step("runs/checkpoint-12") == 12


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """With total_limit=1 the old checkpoint is deleted only once the new one is complete."""
    accelerator, model, optimizer = _accelerator()
    save_checkpoint(accelerator, tmp_path, 1, total_limit=1)
    original = accelerator.save_state

    def crash_halfway(output_dir):
        (Path(output_dir)).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(accelerator, "save_state", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(accelerator, tmp_path, 2, total_limit=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"
    monkeypatch.setattr(accelerator, "save_state", original)
    save_checkpoint(accelerator, tmp_path, 2, total_limit=1)   # the leftover staging folder is cleaned up
    assert _names(tmp_path) == ["checkpoint-2"]


def test_resaving_a_step_replaces_it(tmp_path):
    accelerator, model, optimizer = _accelerator()
    save_checkpoint(accelerator, tmp_path, 4, extra={"run": 1})
    save_checkpoint(accelerator, tmp_path, 4, extra={"run": 2})
    assert _names(tmp_path) == ["checkpoint-4"]
    assert load_checkpoint(accelerator, tmp_path / "checkpoint-4") == {"global_step": 4, "extra": {"run": 2}}


def test_find_checkpoint(tmp_path, caplog):
    accelerator, model, optimizer = _accelerator()
    assert find_checkpoint(tmp_path, None) is None
    assert find_checkpoint(tmp_path / "missing", "latest") is None
    save_checkpoint(accelerator, tmp_path, 2)
    save_checkpoint(accelerator, tmp_path, 5)
    (tmp_path / "checkpoint-7").mkdir()                                   # a save killed before the marker
    (tmp_path / "checkpoint-best").mkdir()
    with caplog.at_level(logging.WARNING, logger="met3r_diffusers.training_utils"):
        assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-5"
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-7" in caplog.text
    assert find_checkpoint(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"
    assert find_checkpoint("elsewhere", str(tmp_path / "checkpoint-2")) == tmp_path / "checkpoint-2"
    with pytest.raises(ValueError, match="resume_from_checkpoint 'checkpoint-7'.*incomplete"):
        find_checkpoint(tmp_path, "checkpoint-7")
    with pytest.raises(ValueError, match=r"no such checkpoint.*\['checkpoint-2', 'checkpoint-5'\]"):
        find_checkpoint(tmp_path, "checkpoint-3")
    # a file truncated after the save (its size no longer matches the marker) makes the checkpoint incomplete
    optimizer_file = tmp_path / "checkpoint-5" / "optimizer.bin"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"


def test_a_checkpoint_of_another_kind_is_refused_and_an_unmarked_one_warns(tmp_path, caplog):
    accelerator, model, optimizer = _accelerator()
    path = save_checkpoint(accelerator, tmp_path, 2, kind="train_met3r_reward")
    assert json.loads((path / CHECKPOINT_MARKER).read_text())["kind"] == "train_met3r_reward"
    weights = [p.detach().clone() for p in model.parameters()]
    _train_step(model, optimizer)
    with pytest.raises(ValueError, match="written by 'train_met3r_reward', not by 'train_met3r_finetune'"):
        load_checkpoint(accelerator, path, kind="train_met3r_finetune")
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # refused before loading
    assert load_checkpoint(accelerator, path, kind="train_met3r_reward") == {"global_step": 2, "extra": {}}
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert load_checkpoint(accelerator, path)["global_step"] == 2  # no kind asked: no check
    older = save_checkpoint(accelerator, tmp_path, 3)  # as versions before the kind was recorded
    marker = json.loads((older / CHECKPOINT_MARKER).read_text())
    del marker["kind"]
    (older / CHECKPOINT_MARKER).write_text(json.dumps(marker))
    with caplog.at_level("WARNING"):
        assert load_checkpoint(accelerator, older, kind="train_met3r_finetune")["global_step"] == 3
    assert "does not record what wrote it" in caplog.text
    with pytest.raises(ValueError, match="kind"):
        save_checkpoint(accelerator, tmp_path, 4, kind="")


def test_load_checkpoint_restores_rng_and_refuses_a_bad_random_state_file(tmp_path):
    accelerator, model, optimizer = _accelerator()
    _seed_everything(1)
    path = save_checkpoint(accelerator, tmp_path, 3, extra={"note": "x"})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    _train_step(model, optimizer)
    assert load_checkpoint(accelerator, path) == {"global_step": 3, "extra": {"note": "x"}}
    actual = (random.random(), np.random.rand(), torch.rand(3))
    assert actual[:2] == expected[:2] and torch.equal(actual[2], expected[2])

    rng_file = path / "random_states_0.pkl"
    rng_file.write_bytes(b"\0" * rng_file.stat().st_size)   # same size: the marker still calls it complete
    accelerator.load_state(str(path))                        # Accelerate only logs "Could not load random states"
    with pytest.raises(ValueError, match="random-state file .*random_states_0.pkl does not load"):
        load_checkpoint(accelerator, path)
    (path / CHECKPOINT_MARKER).unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(accelerator, path)


def test_save_checkpoint_argument_checks(tmp_path):
    accelerator, _, _ = _accelerator()
    with pytest.raises(ValueError, match="global_step"):
        save_checkpoint(accelerator, tmp_path, -1)
    with pytest.raises(ValueError, match="total_limit"):
        save_checkpoint(accelerator, tmp_path, 1, total_limit=0)
    with pytest.raises(ValueError, match="extra must be a JSON-able dict"):
        save_checkpoint(accelerator, tmp_path, 1, extra={"tensor": torch.zeros(1)})
    assert not tmp_path.joinpath("checkpoint-1").exists()


# ----------------------------------------------------------------------------- data order and RNG isolation


def test_epoch_batches_are_a_sharded_seeded_permutation():
    batches = epoch_batches(11, 2, seed=3, epoch=1)
    assert batches == epoch_batches(11, 2, seed=3, epoch=1) != epoch_batches(11, 2, seed=3, epoch=2)
    assert batches != epoch_batches(11, 2, seed=4, epoch=1)
    assert len(batches) == 5 and len({i for b in batches for i in b}) == 10
    shards = [epoch_batches(11, 2, seed=3, epoch=1, num_processes=2, process_index=k) for k in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    # process k takes its slice of each global batch of 4: the first 8 samples of the same permutation
    merged = [i for step in zip(*shards) for batch in step for i in batch]
    assert merged == [i for b in batches[:4] for i in b]
    with pytest.raises(ValueError, match="seed"):
        epoch_batches(4, 1, seed=-1, epoch=0)
    with pytest.raises(ValueError, match="process_index"):
        epoch_batches(4, 1, seed=0, epoch=0, num_processes=2, process_index=2)
    assert resume_position(7, 3, 2) == (2, 2) and resume_position(6, 3) == (2, 0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_dataloader_skips_and_leaves_the_global_rng_alone(num_workers):
    accelerator, _, _ = _accelerator()
    dataset = list(range(10))
    full = [b.tolist() for b in epoch_dataloader(accelerator, dataset, 3, seed=0, epoch=2, num_workers=num_workers)]
    assert full == epoch_batches(10, 3, seed=0, epoch=2)
    state = torch.get_rng_state()
    tail = [b.tolist() for b in epoch_dataloader(accelerator, dataset, 3, 0, 2, skip_batches=2,
                                                 num_workers=num_workers)]
    assert torch.equal(torch.get_rng_state(), state) and tail == full[2:]
    with pytest.raises(ValueError, match="skip_batches"):
        epoch_dataloader(accelerator, dataset, 3, 0, 2, skip_batches=4)


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_preserved_rng_state():
    _seed_everything(0)
    expected = (torch.rand(2), random.random(), np.random.rand())
    _seed_everything(0)
    with preserved_rng_state():
        torch.rand(5), random.random(), np.random.rand(3)  # noqa: B018 - draws from each RNG
        next(iter(torch.utils.data.DataLoader(range(3))))  # draws a base seed from the global RNG
    actual = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(actual[0], expected[0]) and actual[1:] == expected[1:]


# ----------------------------------------------------------------------------- SIGKILL during a real training run

# every write, rename and delete of checkpoint files of the save at step 2 and of its rotation, in order
SECOND_SAVE = [
    "rmtree .checkpoint-2.incomplete",                       # 0: leftover of an earlier killed save, if any
    "write .checkpoint-2.incomplete/model.safetensors",      # 1
    "write .checkpoint-2.incomplete/optimizer.bin",          # 2
    "write .checkpoint-2.incomplete/scheduler.bin",          # 3
    "write .checkpoint-2.incomplete/random_states_0.pkl",    # 4
    f"write .checkpoint-2.incomplete/{CHECKPOINT_MARKER}",   # 5: last, after every state file is fsynced
    "rename .checkpoint-2.incomplete",                       # 6: into place as checkpoint-2
    "rmtree .checkpoint-1.deleting",                         # 7: rotation (limit 1) starts
    "rename checkpoint-1",                                   # 8: the old checkpoint disappears at once
    "rmtree .checkpoint-1.deleting",                         # 9
]
# (kill before SECOND_SAVE[k], tear that file in half first, the checkpoint `latest` must then find)
KILL_POINTS = [(1, False, 1), (2, True, 1), (4, False, 1), (5, False, 1), (6, False, 1), (8, False, 2), (9, False, 2)]
KILL_IDS = [f"before-{SECOND_SAVE[k].split('/')[-1].split()[-1]}-{k}" + ("-torn" if torn else "")
            for k, torn, _ in KILL_POINTS]


def _script_args(data_dir, output_dir, *extra):
    """3 steps, a checkpoint every step, at most 1 kept; LoRA, λ > 0, a random pair per step, validation at the end."""
    return [
        "--tiny_test_model", "--train_data_dir", str(data_dir), "--output_dir", str(output_dir), "--use_lora",
        "--train_batch_size", "2", "--met3r_factory", TOY_METRIC, "--met3r_kwargs", '{"shift": 1}',
        "--met3r_pairs", "all", "--met3r_num_pairs", "1", "--met3r_max_timestep", "700",
        "--num_validation_samples", "2", "--validation_inference_steps", "2", "--validation_steps", "0",
        "--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1", *extra,
    ]


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory):
    """One worker subprocess: a reference run, then per kill point a killed run and its resume (see `_kill_worker`)."""
    from met3r_diffusers.data import make_toy_multiview_dataset

    root = tmp_path_factory.mktemp("kill")
    data = make_toy_multiview_dataset(root / "toy", num_scenes=6, num_views=3, resolution=32)
    process = subprocess.run([sys.executable, __file__, str(root), str(data)], capture_output=True, text=True,
                             timeout=600, check=False)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-4000:]
    return root, json.loads((root / "summary.json").read_text())


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    return {(tag, e.step): e.value for tag in ("loss", "diffusion_loss", "met3r_loss", "lr")
            for e in events.Scalars(tag)}


def _lora(output_dir):
    from safetensors.torch import load_file

    return load_file(str(output_dir / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_the_worker_sees_every_checkpoint_event(kill_runs):
    _, summary = kill_runs
    events = summary["reference"]["events"]
    start = events.index(SECOND_SAVE[0])
    assert events[start: events.index("rmtree .checkpoint-3.incomplete")] == SECOND_SAVE


@pytest.mark.slow
@pytest.mark.parametrize("kill_index", range(len(KILL_POINTS)), ids=KILL_IDS)
def test_sigkill_during_checkpointing_then_resume_is_bit_exact(kill_runs, kill_index):
    """A kill anywhere in save_checkpoint leaves a complete checkpoint; `latest` resumes to bit-identical results."""
    root, summary = kill_runs
    _, _, resumed_from = KILL_POINTS[kill_index]
    case, reference = summary["kills"][kill_index], summary["reference"]
    assert case["killed_by_sigkill"] and case["events_before_kill"] == SECOND_SAVE[: KILL_POINTS[kill_index][0]]
    assert case["latest_after_kill"] == f"checkpoint-{resumed_from}"
    resumed = case["resumed"]
    assert resumed["global_step"] == 3 and resumed["resumed_from"].endswith(f"checkpoint-{resumed_from}")

    output_dir, reference_dir = root / f"kill-{kill_index}", root / "reference"
    expected, actual = _lora(reference_dir), _lora(output_dir)
    assert expected.keys() == actual.keys() and len(expected) > 0
    assert max((actual[k] - expected[k]).abs().max().item() for k in expected) == 0
    assert all(torch.equal(actual[k], expected[k]) for k in expected)
    assert resumed["final_diffusion_loss"] == reference["final_diffusion_loss"]
    assert resumed["validation_score"] == reference["validation_score"]
    expected_logs, logged = (_scalars(d / "logs" / "met3r-finetune") for d in (reference_dir, output_dir))
    assert {step for _, step in expected_logs} == {1, 2, 3}
    resumed_keys = {key for key in logged if key[1] > resumed_from}
    assert resumed_keys == {key for key in expected_logs if key[1] > resumed_from}
    assert all(logged[key] == expected_logs[key] for key in resumed_keys)
    # the resumed run's own saves cleaned up what the kill left behind
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-3"]
    assert not [p.name for p in output_dir.iterdir() if p.name.startswith(".checkpoint-")]


# ----------------------------------------------------------------------------- the worker


class _Probe:
    """Counts every write / rename / delete of a checkpoint file under `output_dir`; SIGKILLs before number `kill_at`.

    torch.save and safetensors write from C++ / Rust, without an "open" audit event, so both are wrapped (before
    accelerate imports safetensors' save_file by name); opens, renames and rmtrees are seen by an audit hook.
    """

    def __init__(self):
        self.output_dir, self.kill_at, self.torn, self.events = "", 0, False, []

    def reset(self, output_dir, kill_at, torn):
        self.output_dir, self.kill_at, self.torn, self.events = os.path.abspath(output_dir), kill_at, torn, []

    def is_kill_point(self, kind, path) -> bool:
        path = os.path.abspath(os.fsdecode(path))
        if not self.output_dir or not path.startswith(self.output_dir + os.sep):
            return False
        relative = os.path.relpath(path, self.output_dir)
        if "checkpoint" not in relative:
            return False
        self.events.append(f"{kind} {relative}")
        return len(self.events) == self.kill_at

    def kill(self):
        Path(self.output_dir).parent.joinpath(Path(self.output_dir).name + ".events").write_text(
            json.dumps(self.events[: self.kill_at - 1]))
        os.kill(os.getpid(), signal.SIGKILL)

    def audit(self, name, args):
        if name == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and self.is_kill_point("write", args[0]):
                self.kill()
        elif name in ("os.rename", "shutil.rmtree") and self.is_kill_point(name.split(".")[-1], args[0]):
            self.kill()

    def install(self):
        import safetensors.torch

        torch_save, safe_save = torch.save, safetensors.torch.save_file

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and self.is_kill_point("write", f):
                if self.torn:  # half of the file on disk, then the kill
                    buffer = io.BytesIO()
                    torch_save(obj, buffer, *args, **kwargs)
                    Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                self.kill()
            return torch_save(obj, f, *args, **kwargs)

        def save_file(tensors, filename, *args, **kwargs):
            if self.is_kill_point("write", filename):
                self.kill()
            return safe_save(tensors, filename, *args, **kwargs)

        torch.save, safetensors.torch.save_file = save, save_file
        sys.addaudithook(self.audit)


def _kill_worker(root: Path, data_dir: str) -> None:
    """Import once, then fork one child per run (no thread pool exists before the forks): the reference run, and per
    kill point a run that SIGKILLs itself during the save at step 2 and a run resuming from `latest`."""
    probe = _Probe()
    probe.install()
    script = load_script(SCRIPT, "train_met3r_finetune")
    # what every run imports lazily (the tiny models, LoRA, the validation scheduler, the LoRA saver), imported once
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: F401

    def child(output_dir, kill_at=0, torn=False, *extra):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                probe.reset(output_dir, kill_at, torn)
                torch.set_num_threads(1)  # the same arithmetic in every run (and no thread pool fighting the load)
                args = script.parse_args(_script_args(data_dir, output_dir, *extra))
                resume = find_checkpoint(output_dir, args.resume_from_checkpoint)
                result = script.main(args)
                validation = result["validation"][-1]["score"] if result["validation"] else None
                Path(f"{output_dir}.json").write_text(json.dumps({
                    "events": probe.events, "global_step": result["global_step"], "resumed_from": str(resume),
                    "final_diffusion_loss": result["final_diffusion_loss"], "validation_score": validation}))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return status

    summary = {"kills": []}
    assert child(root / "reference") == 0
    summary["reference"] = json.loads((root / "reference.json").read_text())
    start = summary["reference"]["events"].index(SECOND_SAVE[0])
    for index, (position, torn, _) in enumerate(KILL_POINTS):
        output_dir = root / f"kill-{index}"
        status = child(output_dir, start + position + 1, torn)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        events = json.loads(output_dir.with_name(output_dir.name + ".events").read_text()) if killed else []
        latest = find_checkpoint(output_dir, "latest")
        assert child(output_dir, 0, False, "--resume_from_checkpoint", "latest") == 0
        summary["kills"].append({
            "killed_by_sigkill": killed, "events_before_kill": events[start:],
            "latest_after_kill": latest.name if latest else None,
            "resumed": json.loads(output_dir.with_name(output_dir.name + ".json").read_text()),
        })
    (root / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    _kill_worker(Path(sys.argv[1]), sys.argv[2])
