"""Checkpoint resolution and loading: Hugging Face repo ids, local directories, official `.pth` files.

Shared by every network loader of the package:

* `resolve_files` finds files of a hub repo (through `huggingface_hub`: cache, `HF_HUB_OFFLINE`,
  revisions) or of a local directory, and explains what to do when they are not available.
* `load_pretrained` reads a checkpoint into a `Checkpoint` (constructor kwargs + state dict),
  from `config.json` + `model.safetensors` or from an official Naver `.pth`
  (`{"args": Namespace(model="Class(kw=...)"), "model": state_dict}`), without running code
  from the file: the pickle is read with `weights_only=True` and the constructor string is
  parsed as literals only.
* `load_state_dict_strict` loads weights and names missing / unexpected keys in its error.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# names allowed inside an official constructor string, e.g. depth_mode=('exp', -inf, inf)
_LITERAL_NAMES = {"inf": float("inf"), "nan": float("nan"), "True": True, "False": False, "None": None}


@dataclass
class Checkpoint:
    """A checkpoint read from disk: constructor kwargs, state dict, official class name if known."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    class_name: str | None = None


def resolve_files(
    name_or_path: PathLike,
    filenames: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME),
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    local_files_only: bool | None = None,
) -> dict[str, Path]:
    """Local paths of `filenames` from a local directory or a Hugging Face repo id.

    Raises FileNotFoundError naming every missing file and how to provide it.
    """
    path = Path(name_or_path)
    if path.is_dir():
        missing = [f for f in filenames if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is missing {', '.join(missing)} (expected files: {', '.join(filenames)})")
        return {f: path / f for f in filenames}
    repo_id = str(name_or_path)
    if path.suffix in _TORCH_SUFFIXES or repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: no such file or directory, and not a Hugging Face repo id")

    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    resolved, missing, reasons = {}, [], []
    for filename in filenames:
        try:
            resolved[filename] = Path(hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=bool(local_files_only)
            ))
        except (LocalEntryNotFoundError, EntryNotFoundError) as err:
            missing.append(filename)
            reasons.append(f"{filename}: {type(err).__name__}")
    if missing:
        offline = bool(local_files_only) or constants.HF_HUB_OFFLINE
        cache = cache_dir or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"Could not get {', '.join(missing)} of '{repo_id}' (revision {revision or 'main'}): "
            f"{'offline mode' if offline else 'not in the cache and the download failed'} "
            f"(HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}, cache: {cache}; {'; '.join(reasons)}).\n"
            f"To provide them: on a machine with internet access run "
            f"`hf download {repo_id} {' '.join(filenames)}` and copy the cache to {cache} "
            f"(or pass cache_dir=), or put {', '.join(filenames)} in a local directory and pass its path, "
            f"or pass the path of an official .pth checkpoint."
        )
    return resolved


def parse_constructor_call(text: str) -> tuple[str, dict[str, Any]]:
    """Parse an official constructor string such as "AsymmetricMASt3R(enc_depth=24, ...)" safely.

    Only literal arguments (numbers, strings, tuples, lists, dicts, inf, float('inf')) are accepted;
    nothing is evaluated. Returns (class name, kwargs).
    """
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse the checkpoint's model string {text!r}: {err}") from err
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)) or call.args:
        raise ValueError(f"expected 'ClassName(keyword=value, ...)' as model string, got {text!r}")
    if any(kw.arg is None for kw in call.keywords):
        raise ValueError(f"'**' arguments are not supported in the model string {text!r}")
    return call.func.id, {kw.arg: _literal(kw.value, text) for kw in call.keywords}


def _literal(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _LITERAL_NAMES:
        return _LITERAL_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, text)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_literal(e, text) for e in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k, text): _literal(v, text) for k, v in zip(node.keys, node.values)}
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "float"
            and len(node.args) == 1 and not node.keywords):
        return float(_literal(node.args[0], text))
    raise ValueError(f"unsupported expression {ast.unparse(node)!r} in the model string {text!r}")


def _load_torch_checkpoint(path: Path) -> Checkpoint:
    """Read an official Naver checkpoint: {"args": Namespace(model="Class(...)") | str, "model": state_dict}."""
    # torch >= 2.5 can allow-list the argparse.Namespace that official checkpoints pickle
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        with safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refusing a global, truncated file, ...
        raise ValueError(f"{path}: cannot read this checkpoint safely (weights_only=True): {err}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        keys = list(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected an official checkpoint with 'args' and 'model' entries, got {keys}")
    args = ckpt["args"]
    model_string = args.get("model") if isinstance(args, dict) else getattr(args, "model", args)
    if not isinstance(model_string, str):
        raise ValueError(f"{path}: 'args' holds no model constructor string")
    class_name, kwargs = parse_constructor_call(model_string)
    return Checkpoint(config=kwargs, state_dict=ckpt["model"], class_name=class_name)


def load_pretrained(
    name_or_path: PathLike,
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    local_files_only: bool | None = None,
) -> Checkpoint:
    """Read a checkpoint from a local official `.pth`, a local directory or a Hugging Face repo id."""
    path = Path(name_or_path)
    if path.is_file():
        if path.suffix not in _TORCH_SUFFIXES:
            raise ValueError(f"{path}: expected a directory, a repo id or a {'/'.join(_TORCH_SUFFIXES)} file")
        return _load_torch_checkpoint(path)
    from safetensors.torch import load_file

    files = resolve_files(
        name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    try:
        config = json.loads(files[CONFIG_NAME].read_text())
    except ValueError as err:
        raise ValueError(f"{files[CONFIG_NAME]}: not a valid JSON config: {err}") from err
    try:
        state_dict = load_file(str(files[WEIGHTS_NAME]))
    except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{files[WEIGHTS_NAME]}: cannot read the weights (truncated or corrupt?): {err}") from err
    return Checkpoint(config=config, state_dict=state_dict)


def save_pretrained(state_dict: dict[str, torch.Tensor], config: dict[str, Any], save_directory: PathLike) -> None:
    """Write `config.json` (constructor kwargs) and `model.safetensors`, as huggingface_hub's mixin does."""
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def _key_list(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], assign: bool = False, source: str = "checkpoint"
) -> None:
    """Load `state_dict` into `module`; raise ValueError naming missing / unexpected / mis-shaped keys."""
    try:
        result = module.load_state_dict(state_dict, strict=False, assign=assign)
    except RuntimeError as err:  # size mismatches are reported even with strict=False
        raise ValueError(f"{source} does not fit {type(module).__name__}: {err}") from err
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys: {_key_list(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys: {_key_list(result.unexpected_keys)}")
    if problems:
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
