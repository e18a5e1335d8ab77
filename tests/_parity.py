"""Access to the golden parity fixtures in ../shared/parity (see each folder's README)."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("MET3R_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))


def parity_path(*parts: str) -> Path:
    """Path inside the parity folder; skips the test (with a reason) when fixtures are absent."""
    path = PARITY_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"parity fixture {path} not found (set MET3R_PARITY_DIR)")
    return path


def load_tensors(*parts: str) -> dict[str, torch.Tensor]:
    """Load one safetensors fixture file."""
    return load_file(str(parity_path(*parts)))


def load_json(*parts: str) -> dict:
    """Load one JSON file of the fixtures (index.json, manifests)."""
    return json.loads(parity_path(*parts).read_text())


def _weights_module():
    spec = importlib.util.spec_from_file_location("_parity_weights", parity_path("weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def standin_state_dict(manifest_parts: tuple[str, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic stand-in weights for a `*.manifest.json` (rebuilt by parity/weights.py)."""
    manifest = load_json(*manifest_parts)
    return _weights_module().make_state_dict(manifest["tensors"], seed)
