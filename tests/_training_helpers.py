"""Helpers of the training-script tests: the scripts as modules, checkpoint contents."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FINETUNE_SCRIPT = REPO_ROOT / "training" / "train_met3r_finetune.py"
REWARD_SCRIPT = REPO_ROOT / "training" / "train_met3r_reward.py"
TOY_METRIC = "met3r_diffusers.testing:FeatureConsistencyMetric"


def load_script(path: Path, name: str) -> ModuleType:
    """Import a training script (or any file) as the module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint_state(path: Path, with_scheduler: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint folder's model weights and optimizer moments (and its LR scheduler's last_epoch) by name."""
    from safetensors.torch import load_file

    state = {f"model.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
    optimizer = torch.load(path / "optimizer.bin", weights_only=False)
    for index, values in optimizer["state"].items():
        state.update({f"optim.{index}.{k}": torch.as_tensor(v) for k, v in values.items()})
    if with_scheduler:
        scheduler = torch.load(path / "scheduler.bin", weights_only=False)
        state["scheduler.last_epoch"] = torch.tensor(scheduler["last_epoch"])
    return state
