"""Kill-safe checkpoints and bit-exact resume for Accelerate training scripts.

`save_checkpoint` writes `accelerator.save_state` into a hidden staging folder, then a completion marker (global step
and a JSON-able `extra` dict, written and fsynced after every other file), then renames the folder to
`checkpoint-<step>` in one atomic step. A kill at any point leaves either the previous complete checkpoints or the new
complete one, never a `checkpoint-<step>` that cannot be loaded. `find_checkpoint` resolves `latest` to the newest
complete `checkpoint-<int>`; `load_checkpoint` restores the state and refuses a random-state file that does not load.

The data order is a pure function of (seed, epoch): `epoch_dataloader` builds the loader of one epoch, sharded over
the processes and with the batches already consumed skipped, and draws nothing from the global RNGs, so that
restoring the RNG states of a checkpoint is enough for the rest of the run to be bit-identical.

The rest is the scaffolding both training scripts share: their common command-line options and checks, the metric
factory (`load_metric`), pretrained component loading, the Accelerator, optimizer and trackers, text embeddings and
view labels, validation logging and the final weights.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .validation import check_finite, check_positive_int

__all__ = [
    "CHECKPOINT_MARKER",
    "LORA_TARGET_MODULES",
    "LR_SCHEDULERS",
    "PREDICTION_TYPES",
    "add_model_arguments",
    "add_metric_arguments",
    "add_optimisation_arguments",
    "add_tracking_arguments",
    "check_resolution",
    "checkpoint_step",
    "epoch_batches",
    "epoch_dataloader",
    "find_checkpoint",
    "finish_training",
    "init_trackers",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_metric",
    "load_pretrained_components",
    "make_accelerator",
    "make_optimizer",
    "prepare_components",
    "preserved_rng_state",
    "resolve_factory",
    "resume_position",
    "run_validation",
    "save_checkpoint",
    "save_weights",
    "text_embeddings",
    "validate_training_args",
    "view_labels",
]

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint_complete.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Hidden siblings of checkpoint-<step>: a save in progress, a checkpoint being replaced, one being deleted.
_STAGING, _REPLACED, _DELETING = ".incomplete", ".replaced", ".deleting"
_RNG_STATE_FILE = "random_states_{}.pkl"  # accelerate.checkpointing's name for process i's RNG states
_RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


# ----------------------------------------------------------------------------- checkpoint folders


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a folder named `checkpoint-<int>`; None for any other name (`checkpoint-best`, ...)."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def _read_marker(path: Path) -> dict[str, Any] | None:
    """The completion marker of a checkpoint folder if it is complete (every listed file there, same size)."""
    try:
        marker = json.loads((path / CHECKPOINT_MARKER).read_text())
        files = marker["files"]
        if not all((path / name).stat().st_size == size for name, size in files.items()):
            return None
        return {"global_step": int(marker["global_step"]), "extra": marker.get("extra") or {}, "kind": marker.get("kind")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint whose save finished (completion marker present and every file intact)."""
    return _read_marker(Path(path)) is not None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete `checkpoint-<int>` folders of `output_dir`, oldest step first (incomplete ones: a warning each)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        step = checkpoint_step(path)
        if step is None or not path.is_dir():
            continue
        if is_complete_checkpoint(path):
            found.append((step, path))
        else:
            logger.warning(f"skipping incomplete checkpoint {path} (no valid {CHECKPOINT_MARKER}: its save was "
                           "interrupted, or it was written without met3r_diffusers.training_utils.save_checkpoint)")
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from: None for None, the newest complete one (or None) for "latest", else the path.

    An explicit name is looked up in `output_dir` first, then taken as a path; it must be complete.
    """
    if resume_from_checkpoint is None:
        return None
    if str(resume_from_checkpoint) == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info(f"no complete checkpoint in {output_dir}: starting from scratch")
            return None
        return checkpoints[-1]
    path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        path = Path(resume_from_checkpoint)
    if not path.is_dir():
        names = [p.name for p in list_checkpoints(output_dir)]
        raise ValueError(f"resume_from_checkpoint {str(resume_from_checkpoint)!r}: no such checkpoint (neither a "
                         f"folder nor one in {str(output_dir)!r}; complete checkpoints there: {names})")
    if not is_complete_checkpoint(path):
        raise ValueError(f"resume_from_checkpoint {str(resume_from_checkpoint)!r}: {path} is an incomplete checkpoint "
                         f"(no valid {CHECKPOINT_MARKER}: its save was interrupted or it was not written by "
                         "save_checkpoint); resume from an older one or from 'latest'")
    return path


# ----------------------------------------------------------------------------- save / load


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hidden(output_dir: Path, step: int, suffix: str) -> Path:
    return output_dir / f".checkpoint-{step}{suffix}"


def _remove(path: Path) -> None:
    """Delete a checkpoint folder: renamed to a hidden name first (atomic), so that it is never half there."""
    if not path.exists():
        return
    step = checkpoint_step(path)
    if step is not None:
        trash = _hidden(path.parent, step, _DELETING)
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        path = trash
    shutil.rmtree(path)


def _rotate(output_dir: Path, keep: Path, total_limit: int | None) -> None:
    """Drop leftovers of interrupted saves, then the oldest complete checkpoints beyond `total_limit` (`keep` stays)."""
    for leftover in output_dir.glob(".checkpoint-*"):
        if leftover.is_dir() and leftover.suffix in (_STAGING, _REPLACED, _DELETING):
            shutil.rmtree(leftover)
    if total_limit is None:
        return
    others = [path for path in list_checkpoints(output_dir) if path != keep]
    for path in others[: max(0, len(others) - (total_limit - 1))]:
        logger.info(f"checkpoints_total_limit {total_limit}: removing {path}")
        _remove(path)


def save_checkpoint(
    accelerator: Any,
    output_dir: str | os.PathLike,
    global_step: int,
    total_limit: int | None = None,
    extra: dict[str, Any] | None = None,
    kind: str | None = None,
) -> Path:
    """Kill-safe `accelerator.save_state` to `output_dir/checkpoint-<global_step>`; call it on every process.

    `kind` names what wrote the state (the training scripts pass their own name), so that `load_checkpoint` can
    refuse another script's checkpoint. The state is written to a hidden staging folder; once every process has
    written its part, the main process fsyncs the files, writes the completion marker (`global_step`, `extra`,
    `kind`, file sizes) last, renames the folder into place
    (replacing an older checkpoint of the same step), and only then removes the oldest complete checkpoints beyond
    `total_limit` and the leftovers of interrupted saves. Every process returns after the rename.
    """
    if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
        raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
    check_positive_int("total_limit", total_limit, optional=True)
    if kind is not None and (not isinstance(kind, str) or not kind):
        raise ValueError(f"kind must be a non-empty str or None, got {kind!r}")
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as error:
        raise ValueError(f"extra must be a JSON-able dict: {error}") from None
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{global_step}"
    staging = _hidden(output_dir, global_step, _STAGING)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        for path in files:
            _fsync(path)
        marker = {"global_step": global_step, "extra": extra, "kind": kind,
                  "files": {str(p.relative_to(staging)): p.stat().st_size for p in files}}
        with open(staging / CHECKPOINT_MARKER, "w") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(staging)
        if final.exists():  # e.g. a run resumed from an earlier checkpoint reaches this step again
            replaced = _hidden(output_dir, global_step, _REPLACED)
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(staging, final)
        _fsync(output_dir)
        logger.info(f"saved state to {final}")
        _rotate(output_dir, final, total_limit)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """`accelerator.load_state(path)` of a complete checkpoint; returns its marker's `global_step` and `extra`.

    Unlike Accelerate, which only logs it, a random-state file of this process that is missing or does not load is
    a ValueError (resuming with other RNG states would silently not be exact). With `kind`, a checkpoint saved
    with another kind is a ValueError before anything loads (one script's LoRA state can have the same names as
    another's and would load silently); one saved without a kind (older versions) loads with a warning.
    """
    path = Path(path)
    marker = _read_marker(path)
    if marker is None:
        raise ValueError(f"path {str(path)!r} is not a complete checkpoint (no valid {CHECKPOINT_MARKER})")
    saved_kind = marker.pop("kind")
    if kind is not None and saved_kind is not None and saved_kind != kind:
        raise ValueError(f"checkpoint {str(path)!r} was written by {saved_kind!r}, not by {kind!r}: resuming it "
                         "would mix two trainings; pass another --output_dir or --resume_from_checkpoint")
    if kind is not None and saved_kind is None:
        logger.warning(f"checkpoint {path} does not record what wrote it (an older version); loading it as {kind!r}")
    rng_file = path / _RNG_STATE_FILE.format(accelerator.process_index)
    try:
        states = torch.load(rng_file, weights_only=False)  # our own file, written by accelerator.save_state
        missing = [key for key in _RNG_KEYS if key not in states]
    except Exception as error:  # noqa: BLE001 - any failure to read it means the RNG states are lost
        raise ValueError(f"random-state file {rng_file} does not load ({type(error).__name__}: {error}); "
                         "resuming from this checkpoint would not be exact") from error
    if missing:
        raise ValueError(f"random-state file {rng_file} lacks {missing}; resuming from it would not be exact")
    accelerator.load_state(str(path))
    # set again here: Accelerate swallows any error while setting them
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    logger.info(f"resumed from {path} (step {marker['global_step']})")
    return marker


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run a block (validation, logging samples) without changing the Python, NumPy, torch and CUDA RNG states."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------- data order


def _epoch_generator(seed: int, epoch: int, *stream: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, *stream) through NumPy's SeedSequence (no two tuples alike)."""
    for name, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    high, low = np.random.SeedSequence([seed, epoch, *stream]).generate_state(2)
    return torch.Generator().manual_seed(int(high) << 32 | int(low))


def epoch_batches(
    num_samples: int, batch_size: int, seed: int, epoch: int, num_processes: int = 1, process_index: int = 0
) -> list[list[int]]:
    """This process's batches of one epoch: a permutation seeded by (seed, epoch), cut into global batches of
    `batch_size * num_processes` (an incomplete last one dropped), process `process_index` taking its slice of each."""
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_processes", num_processes)
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
    order = torch.randperm(num_samples, generator=_epoch_generator(seed, epoch)).tolist()
    step = batch_size * num_processes
    start = process_index * batch_size
    return [order[k + start : k + start + batch_size] for k in range(0, num_samples - step + 1, step)]


def epoch_dataloader(
    accelerator: Any,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    skip_batches: int = 0,
    **dataloader_kwargs: Any,
) -> torch.utils.data.DataLoader:
    """The DataLoader of one epoch on this process (`epoch_batches` order), its first `skip_batches` batches skipped.

    Batches come on `accelerator.device`; the loader takes part in `accelerator.accumulate`'s end-of-epoch sync
    like a prepared one, but is not registered for `save_state` (its state is (seed, epoch, skip_batches)). The
    workers' base seed comes from (seed, epoch, process), never from the global RNG. `dataloader_kwargs` go to
    `torch.utils.data.DataLoader` (collate_fn, num_workers, ...). Exact resume needs a dataset whose items depend
    on the index only (workers see other batches after a skip).
    """
    from accelerate.data_loader import DataLoaderShard

    batches = epoch_batches(len(dataset), batch_size, seed, epoch, accelerator.num_processes,
                            accelerator.process_index)
    if not 0 <= skip_batches <= len(batches):
        raise ValueError(f"skip_batches must be in [0, {len(batches)}] (the epoch's batches), got {skip_batches}")
    generator = _epoch_generator(seed, epoch, accelerator.process_index)
    return DataLoaderShard(dataset, device=accelerator.device, batch_sampler=batches[skip_batches:],
                           generator=generator, **dataloader_kwargs)


def resume_position(global_step: int, num_update_steps_per_epoch: int, gradient_accumulation_steps: int = 1
                    ) -> tuple[int, int]:
    """(epoch, batches of that epoch already consumed) after `global_step` optimizer steps (the last update of an
    epoch may take fewer than `gradient_accumulation_steps` batches: Accelerate syncs at the end of the loader)."""
    check_positive_int("num_update_steps_per_epoch", num_update_steps_per_epoch)
    check_positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    epoch, updates = divmod(global_step, num_update_steps_per_epoch)
    return epoch, updates * gradient_accumulation_steps


# ----------------------------------------------------------------------------- command line of the scripts

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The "model" option group: pretrained folder or tiny test model, prediction type, LoRA."""
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="diffusers model folder or hub id with unet/, vae/, scheduler/ and optionally "
                            "text_encoder/ + tokenizer/ sub-folders")
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--tiny_test_model", action="store_true",
                       help="tiny random UNet/VAE/CLIP built from configs (tests, CPU smoke runs; no download)")
    model.add_argument("--prediction_type", type=str, default=None,
                       help=f"one of {PREDICTION_TYPES}; default: the scheduler's")
    model.add_argument("--use_lora", action="store_true", help="train LoRA adapters (peft) instead of the full UNet")
    model.add_argument("--lora_rank", type=int, default=4)


def add_metric_arguments(group: argparse._ArgumentGroup) -> None:
    """The metric options of `group`: --met3r_factory, --met3r_kwargs, --met3r_pairs, --met3r_chunk_size."""
    group.add_argument("--met3r_factory", type=str, default="met3r_diffusers:MEt3R",
                       help="'module:callable' or 'path/to/file.py:callable' returning the metric")
    group.add_argument("--met3r_kwargs", type=str, default="{}", help="JSON keyword arguments for --met3r_factory")
    group.add_argument("--met3r_pairs", type=str, default="adjacent", choices=["adjacent", "all", "reference"])
    group.add_argument("--met3r_chunk_size", type=int, default=None, help="samples per metric call")


def add_optimisation_arguments(parser: argparse.ArgumentParser, output_dir: str, max_train_steps: int) -> None:
    """The "optimisation" option group (output folder, seed, steps, AdamW, LR schedule, mixed precision)."""
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--output_dir", type=str, default=output_dir)
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--max_train_steps", type=int, default=max_train_steps)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--lr_scheduler", type=str, default="constant",
                       help="any of diffusers.optimization's schedules: constant, linear, cosine, ...")
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])


def add_tracking_arguments(parser: argparse.ArgumentParser, checkpointing_steps: int) -> argparse._ArgumentGroup:
    """The "logging, checkpoints, validation" option group; returned for the script's own validation options."""
    track = parser.add_argument_group("logging, checkpoints, validation")
    track.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none")
    track.add_argument("--logging_dir", type=str, default="logs", help="inside output_dir")
    track.add_argument("--checkpointing_steps", type=int, default=checkpointing_steps)
    track.add_argument("--checkpoints_total_limit", type=int, default=None)
    track.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="a checkpoint-N folder (in output_dir) or path, or 'latest': the newest complete one "
                            "(none yet: start from scratch)")
    track.add_argument("--validation_steps", type=int, default=0,
                       help="run the MEt3R evaluation hook every N steps (0: only at the end)")
    track.add_argument("--validation_batch_size", type=int, default=1)
    track.add_argument("--validation_seed", type=int, default=0)
    return track


def validate_training_args(args: argparse.Namespace) -> None:
    """Check the options of the `add_*_arguments` groups before any model is loaded (a ValueError naming the option).

    Every float option of the script, not only these groups', must be finite (NaN and inf are refused).
    """
    for name, value in vars(args).items():
        if isinstance(value, float):
            check_finite(f"--{name}", value)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir!r} exists and is not a folder")
    check_finite("--learning_rate", args.learning_rate, minimum=0)
    check_finite("--adam_weight_decay", args.adam_weight_decay, minimum=0)
    check_finite("--adam_epsilon", args.adam_epsilon, minimum=0)
    check_finite("--max_grad_norm", args.max_grad_norm, minimum=0)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= check_finite(f"--{name}", getattr(args, name)) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir {args.train_data_dir!r} does not exist or is not a folder")
    if args.prediction_type is not None and args.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"--prediction_type must be one of {PREDICTION_TYPES}, got {args.prediction_type!r}")
    if (args.pretrained_model_name_or_path is None) == (not args.tiny_test_model):
        raise ValueError("pass exactly one of --pretrained_model_name_or_path and --tiny_test_model")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"--lr_scheduler must be one of {LR_SCHEDULERS}, got {args.lr_scheduler!r}")
    for name in ("max_train_steps", "gradient_accumulation_steps", "train_batch_size", "checkpointing_steps",
                 "validation_batch_size", "lora_rank"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("seed", "lr_warmup_steps", "validation_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("num_views", "resolution", "met3r_chunk_size", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_views is not None and args.num_views < 2:
        raise ValueError(f"--num_views must be >= 2 (MEt3R scores pairs of views), got {args.num_views}")
    factory = resolve_factory(args.met3r_factory)
    try:
        args.met3r_kwargs = json.loads(args.met3r_kwargs) if isinstance(args.met3r_kwargs, str) else args.met3r_kwargs
    except json.JSONDecodeError as error:
        raise ValueError(f"--met3r_kwargs is not valid JSON: {error}") from None
    if not isinstance(args.met3r_kwargs, dict):
        raise ValueError(f"--met3r_kwargs must be a JSON object of keyword arguments, got {args.met3r_kwargs!r}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no introspectable signature: the call itself will tell
        signature = None
    if signature is not None:
        try:
            signature.bind(**args.met3r_kwargs)
        except TypeError as error:
            raise ValueError(f"--met3r_kwargs do not fit --met3r_factory {args.met3r_factory!r}: {error}") from None


# ----------------------------------------------------------------------------- components of the scripts


def check_resolution(
    args: argparse.Namespace, image_size: tuple[int, int], **extra_sizes: int | None
) -> None:
    """Image sizes must be multiples of the VAE's down-sampling (read from its config only, or the tiny model's).

    `image_size` is the training / sampling size; `extra_sizes` name other sizes the script decodes at
    (`met3r_resolution=`, `reward_resolution=`), checked when not None.
    """
    if args.tiny_test_model:
        from .testing import TINY_TRAINING_VAE_SCALE_FACTOR as factor
    else:
        from diffusers import AutoencoderKL

        config = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision)
        factor = 2 ** (len(config["block_out_channels"]) - 1)
    if any(size % factor for size in image_size):
        origin = "--resolution" if args.resolution is not None else "the images' size (set --resolution)"
        raise ValueError(f"{origin}: {image_size[0]}x{image_size[1]} is not a multiple of the VAE's down-sampling "
                         f"factor {factor}")
    for name, size in extra_sizes.items():
        if size is not None and size % factor:
            raise ValueError(f"--{name} {size} is not a multiple of the VAE's down-sampling factor {factor}")


def resolve_factory(factory: str) -> Callable:
    """The callable named by 'module:callable' or 'path/to/file.py:callable' (ValueError naming --met3r_factory)."""
    module_name, _, attribute = factory.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"--met3r_factory must look like 'module:callable', got {factory!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise FileNotFoundError(f"no such file {module_name!r}")
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as error:
        raise ValueError(f"--met3r_factory {factory!r}: cannot load {module_name!r} ({error})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"--met3r_factory {factory!r}: {module_name!r} has no callable {attribute!r}")
    return function


def load_metric(factory: str, kwargs: dict[str, Any]) -> Any:
    """Build the metric from 'module:callable' or 'path/to/file.py:callable'."""
    return resolve_factory(factory)(**kwargs)


def load_pretrained_components(
    path: str, revision: str | None = None, scheduler_class: type | None = None, prediction_type: str | None = None
) -> dict[str, Any]:
    """UNet, VAE, scheduler (`scheduler_class`, default DDPMScheduler; `prediction_type` set if given) and, where the
    model has them, CLIP text encoder + tokenizer (else None: the UNet is conditioned on a zero text embedding)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    scheduler_class = scheduler_class or DDPMScheduler
    components = {
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision),
        "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision),
        "scheduler": scheduler_class.from_pretrained(path, subfolder="scheduler", revision=revision),
        "text_encoder": None,
        "tokenizer": None,
    }
    if prediction_type is not None:
        components["scheduler"].register_to_config(prediction_type=prediction_type)
    try:
        from transformers import CLIPTextModel, CLIPTokenizer

        components["tokenizer"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        components["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision)
    except OSError:
        logger.info("no tokenizer/text_encoder: the UNet is conditioned on a zero text embedding")
    return components


def make_accelerator(args: argparse.Namespace, gradient_accumulation_steps: int = 1) -> Any:
    """The scripts' Accelerator (trackers in output_dir/logging_dir), INFO logging; fp16 on the CPU is refused."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU (CPU autocast mixes float16 and float32 operands); "
                         "use bf16 or no on the CPU")
    return accelerator


def prepare_components(
    accelerator: Any, components: dict[str, Any], use_lora: bool, lora_rank: int
) -> tuple[torch.dtype, list[torch.nn.Parameter]]:
    """Freeze the VAE and text encoder in the mixed-precision dtype on the device, add LoRA adapters to the UNet if
    `use_lora`; returns that dtype and the UNet's trainable parameters (kept in float32; autocast does the rest)."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    components["vae"].requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    if components["text_encoder"] is not None:
        components["text_encoder"].requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    unet = components["unet"]
    if use_lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGET_MODULES))
    return weight_dtype, [p for p in unet.parameters() if p.requires_grad]


def make_optimizer(
    accelerator: Any, args: argparse.Namespace, parameters: list[torch.nn.Parameter]
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over `parameters` and the --lr_scheduler schedule (warm-up and length scaled by the process count)."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    return optimizer, lr_scheduler


def init_trackers(accelerator: Any, project_name: str, args: argparse.Namespace) -> None:
    """Start the trackers on the main process, with the plain (int, float, str, bool) options as their config."""
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project_name, config=config)


def text_embeddings(prompts: list[str], tokenizer: Any, text_encoder: Any, unet: Any,
                    device: torch.device | str) -> torch.Tensor:
    """(len(prompts), L, D) text embeddings (no gradient), or zeros (len(prompts), 1, cross_attention_dim) without a
    text encoder."""
    if text_encoder is None:
        return torch.zeros(len(prompts), 1, unet.config.cross_attention_dim, device=device)
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        return text_encoder(ids)[0]


def view_labels(unet: Any, batch: int, num_views: int, device: torch.device | str) -> torch.Tensor | None:
    """View index of every batch entry (0..V-1 per sample) when the UNet takes class labels."""
    if unet.config.num_class_embeds is None and unet.config.class_embed_type is None:
        return None
    return torch.arange(num_views, device=device).repeat(batch)


# ----------------------------------------------------------------------------- validation and the end of a run


def run_validation(accelerator: Any, hook: Any, step: int, output_dir: str | os.PathLike, force: bool = False) -> None:
    """`hook(step)` (`hook.evaluate(step)` if `force`) without changing the RNG states; results are logged and
    appended to output_dir/met3r_validation.jsonl by the main process."""
    with preserved_rng_state():  # validation never changes the training's random numbers
        results = hook.evaluate(step) if force else hook(step)
    if results is not None and accelerator.is_main_process:
        logger.info(f"step {step}: MEt3R {results['score']:.5f} {results['pair_scores']}")
        with open(os.path.join(output_dir, "met3r_validation.jsonl"), "a") as f:
            f.write(json.dumps({k: v for k, v in results.items() if not torch.is_tensor(v)}) + "\n")


def finish_training(accelerator: Any, unet: Any, hook: Any, global_step: int, args: argparse.Namespace) -> None:
    """End a run: the last validation (unless `global_step` just had one), the final weights, the trackers closed."""
    accelerator.wait_for_everyone()
    if hook is not None and not (args.validation_steps and global_step % args.validation_steps == 0):
        run_validation(accelerator, hook, global_step, args.output_dir, force=True)
    if accelerator.is_main_process:
        save_weights(unet, args.output_dir, args.use_lora)
    accelerator.end_training()


def save_weights(unet: Any, output_dir: str | os.PathLike, use_lora: bool) -> None:
    """Final weights: LoRA layers (diffusers' pytorch_lora_weights.safetensors) or the full UNet (output_dir/unet)."""
    if use_lora:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=lora_layers, safe_serialization=True)
    else:
        unet.save_pretrained(os.path.join(output_dir, "unet"))
