"""Kill-safe checkpoints and bit-exact resume for Accelerate training scripts.

`save_checkpoint` writes `accelerator.save_state` into a hidden staging folder, then a completion marker (global step
and a JSON-able `extra` dict, written and fsynced after every other file), then renames the folder to
`checkpoint-<step>` in one atomic step. A kill at any point leaves either the previous complete checkpoints or the new
complete one, never a `checkpoint-<step>` that cannot be loaded. `find_checkpoint` resolves `latest` to the newest
complete `checkpoint-<int>`; `load_checkpoint` restores the state and refuses a random-state file that does not load.

The data order is a pure function of (seed, epoch): `epoch_dataloader` builds the loader of one epoch, sharded over
the processes and with the batches already consumed skipped, and draws nothing from the global RNGs, so that
restoring the RNG states of a checkpoint is enough for the rest of the run to be bit-identical.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .validation import check_positive_int

__all__ = [
    "CHECKPOINT_MARKER",
    "checkpoint_step",
    "epoch_batches",
    "epoch_dataloader",
    "find_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "preserved_rng_state",
    "resume_position",
    "save_checkpoint",
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
        return {"global_step": int(marker["global_step"]), "extra": marker.get("extra") or {}}
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
) -> Path:
    """Kill-safe `accelerator.save_state` to `output_dir/checkpoint-<global_step>`; call it on every process.

    The state is written to a hidden staging folder; once every process has written its part, the main process fsyncs
    the files, writes the completion marker (`global_step`, `extra`, file sizes) last, renames the folder into place
    (replacing an older checkpoint of the same step), and only then removes the oldest complete checkpoints beyond
    `total_limit` and the leftovers of interrupted saves. Every process returns after the rename.
    """
    if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
        raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
    check_positive_int("total_limit", total_limit, optional=True)
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
        marker = {"global_step": global_step, "extra": extra,
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


def load_checkpoint(accelerator: Any, path: str | os.PathLike) -> dict[str, Any]:
    """`accelerator.load_state(path)` of a complete checkpoint; returns its marker's `global_step` and `extra`.

    Unlike Accelerate, which only logs it, a random-state file of this process that is missing or does not load is
    a ValueError (resuming with other RNG states would silently not be exact).
    """
    path = Path(path)
    marker = _read_marker(path)
    if marker is None:
        raise ValueError(f"path {str(path)!r} is not a complete checkpoint (no valid {CHECKPOINT_MARKER})")
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
