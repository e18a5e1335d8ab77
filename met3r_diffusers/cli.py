"""`met3r-diffusers` command line: score folders of generated views with MEt3R; fetch the weights.

    met3r-diffusers score out/scene_a out/scene_b --pairs all --out report.json --heatmaps maps/
    met3r-diffusers score "samples/*" --size 256 --batch-size 4 --out report.csv
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m met3r_diffusers.cli score ...
    met3r-diffusers download --out weights.json

A PATH is a folder of views (sorted by name, numbers compared as numbers), a folder of such folders,
or a glob matching either folders (one scene each) or image files (one scene). The report holds one
score per scene and per pair, the settings and the provenance of the numbers (versions, weights and
their sha256, device, times). Under `accelerate launch` the scenes are split across the processes
(whole batches, balanced by number of views) and the main process writes one report equal to a
single-process one. Every scored batch is appended to a journal (`<out>.journal.<rank>`, fsynced), so
`--resume` after a crash, Ctrl-C or SIGKILL scores only what is missing. Exit status: 0 when every scene
was scored, 2 for bad arguments (before any model loads), 3 when some scenes failed (each is in the report
with its error), 1 when the weights cannot be loaded, 130 when interrupted. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import glob
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .data import IMAGE_EXTENSIONS, load_image, natural_key, read_image_size
from .distances import DISTANCES, dissimilarity
from .functional import sample_scores
from .pairs import PAIR_MODES

logger = logging.getLogger(__name__)

_MULTIPLE = 16  # DUSt3R and DINO need image sides that are multiples of the 16-pixel patch
# Pairs whose renderings share less than this fraction of their pixels are flagged and left out of the scene mean
# (see docs/evaluation.md: below 5 % the masked mean averages fewer pixels than ~13 DINO patches at 256x256).
DEFAULT_MIN_OVERLAP = 0.05
FACTORY_ENV = "MET3R_DIFFUSERS_METRIC_FACTORY"
EXIT_OK, EXIT_WEIGHTS, EXIT_USAGE, EXIT_FAILED_SCENES, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_MAX_FILE_NAME_BYTES = 255
_OPTIONAL_DISTANCE_PACKAGES = {"ssim": "torchmetrics", "lpips": "lpips"}
# Settings that change the numbers: a resumed run must use the same ones.
SCORING_SETTINGS = ("pairs", "size", "backbone", "distance", "upsampler", "bf16", "symmetric", "min_overlap",
                    "chunk_size", "backbone_weights", "featup_weights", "revision", "metric_factory")


class UsageError(SystemExit):
    """A bad argument or environment, found before any model loads: one line on stderr, exit status 2."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code
        if os.environ.get("RANK", "0") == "0":  # once, not once per process under accelerate launch
            print(f"met3r-diffusers: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- scenes and views


def _images_in(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def find_scenes(paths: Sequence[str], check_views: bool = True) -> list[tuple[str, list[Path]]]:
    """Expand PATH arguments into (scene name, ordered view files); raises ValueError for unusable paths.

    An existing path is taken literally (even with glob characters in its name); otherwise it is a glob,
    whose folders without images are skipped with a warning. A scene given twice is scored once. A scene
    with fewer than 2 views raises ValueError, unless `check_views=False` (the CLI reports it as a failed scene).
    """
    scenes: list[tuple[str, list[Path]]] = []
    seen: set[tuple[Path, ...]] = set()
    for argument in paths:
        literal = Path(argument)
        matches = [literal] if literal.exists() else [Path(m) for m in sorted(glob.glob(argument), key=natural_key)]
        found = []
        files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
        if files:
            found.append((argument, files))
        for folder in (m for m in matches if m.is_dir()):
            views = _images_in(folder)
            subfolders = [] if views else sorted((d for d in folder.iterdir() if d.is_dir()),
                                                 key=lambda d: natural_key(d.name))
            nested = [(str(folder), views)] if views else [(str(d), _images_in(d)) for d in subfolders]
            nested = [scene for scene in nested if scene[1]]
            if not nested:
                message = f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or in its subfolders"
                if folder == literal:
                    raise ValueError(message)
                print(f"met3r-diffusers: skipping {message}", file=sys.stderr)
            found.extend(nested)
        if not found:
            raise ValueError(f"{argument}: no such folder, and the pattern matches no image or folder of images")
        for name, views in found:
            key = tuple(view.resolve() for view in views)
            if key not in seen:
                seen.add(key)
                scenes.append((name, views))
    if check_views:
        for name, views in scenes:
            if len(views) < 2:
                raise ValueError(f"{name}: a scene needs at least 2 views, found {len(views)}")
    return scenes


def _target_size(stored: tuple[int, int], size: int | None) -> tuple[int, int] | None:
    """(H, W) a view of stored size (H, W) is resized to so that its short side is `size`."""
    if size is None:
        return None
    scale = size / min(stored)
    return max(round(stored[0] * scale), size), max(round(stored[1] * scale), size)


def _cropped(height: int, width: int) -> tuple[int, int]:
    return (height // _MULTIPLE) * _MULTIPLE, (width // _MULTIPLE) * _MULTIPLE


def load_views(files: Sequence[Path], size: int | None) -> torch.Tensor:
    """Read views as (V, 3, H, W) in [-1, 1]: the short side resized to `size` (LANCZOS), then a centre
    crop to multiples of 16. Without `size` the views keep their size (cropped to multiples of 16)."""
    images = []
    for path in files:
        target = None if size is None else _target_size(read_image_size(path), size)
        image = load_image(path, target, Image.LANCZOS)
        full_height, full_width = image.shape[1:]
        height, width = _cropped(full_height, full_width)
        if min(width, height) == 0:
            raise ValueError(f"{path}: {full_width}x{full_height} is smaller than {_MULTIPLE} pixels")
        left, top = (full_width - width) // 2, (full_height - height) // 2
        images.append(image[:, top : top + height, left : left + width])
    if len({a.shape for a in images}) != 1:
        shapes = sorted({f"{a.shape[2]}x{a.shape[1]}" for a in images})
        raise ValueError(f"views of one scene must share a size (got {', '.join(shapes)}); pass --size to resize")
    return torch.stack(images)


def scene_fingerprint(files: Sequence[Path]) -> str:
    """Short digest of a scene's view files (resolved path, size, modification time): what --resume matches on."""
    digest = hashlib.sha256()
    for path in files:
        try:
            stat = path.stat()
            digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:  # gone or unreadable: the scene fails when loaded, and is tried again on --resume
            digest.update(f"{path}\0unreadable\n".encode())
    return digest.hexdigest()[:20]


def _predicted_shape(files: Sequence[Path], size: int | None) -> tuple | None:
    """The (V, H, W) `load_views` will return, from the image headers; None when it cannot tell."""
    try:
        shapes = set()
        for path in files:
            stored = read_image_size(path)
            shapes.add(_cropped(*(_target_size(stored, size) or stored)))
    except (ValueError, OSError):
        return None
    return (len(files), *shapes.pop()) if len(shapes) == 1 and len(files) >= 2 else None


def plan_batches(scenes: Sequence[tuple[str, list[Path]]], size: int | None, batch_size: int) -> list[list[int]]:
    """Scene indices grouped into batches: consecutive scenes of one (V, H, W), at most `batch_size` each.

    Planned from the global scene list (headers only), so the batches, and therefore the numbers, do not depend
    on the number of processes or on what an earlier run already scored.
    """
    if batch_size == 1:
        return [[index] for index in range(len(scenes))]
    batches: list[list[int]] = []
    previous = None
    for index, (_, files) in enumerate(scenes):
        shape = _predicted_shape(files, size)
        if batches and shape is not None and shape == previous and len(batches[-1]) < batch_size:
            batches[-1].append(index)
        else:
            batches.append([index])
        previous = shape
    return batches


def shard_batches(batches: Sequence[Sequence[int]], weights: Sequence[int], num_processes: int) -> list[list[int]]:
    """Batch numbers of each process: largest batches first to the least-loaded process (load = views);
    deterministic, and each process keeps its batches in their global order."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    loads = [0] * num_processes
    shards: list[list[int]] = [[] for _ in range(num_processes)]
    for number in sorted(range(len(batches)), key=lambda n: (-sum(weights[k] for k in batches[n]), n)):
        process = min(range(num_processes), key=lambda p: (loads[p], p))
        shards[process].append(number)
        loads[process] += sum(weights[k] for k in batches[number])
    return [sorted(shard) for shard in shards]


def heatmap_overlay(view: torch.Tensor, score_map: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """(3, H, W) view in [-1, 1], (H, W) dissimilarity map and overlap mask -> (H, W, 3) uint8 picture.

    Inside the overlap the view is blended with the score (blue = 0 consistent, red >= 1); outside it
    is shaded dark grey.
    """
    image = (view.float().cpu().clamp(-1, 1) + 1) / 2
    value = score_map.float().cpu().nan_to_num(0).clamp(0, 1)
    colour = torch.stack([value, 0.2 * torch.ones_like(value), 1 - value])
    inside = mask.cpu().bool()
    picture = torch.where(inside, 0.4 * image + 0.6 * colour, 0.25 * image)
    return (picture.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def heatmap_name(index: int, scene: str, view_i: str, view_j: str) -> str:
    """`<scene number>_<scene>_<view i>_<view j>.png`, shortened (with a digest of the full name) to 255 bytes."""
    scene = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(scene).stem or scene)
    stem = f"{index:04d}_{scene}_{view_i}_{view_j}"
    if len(stem.encode()) + 4 <= _MAX_FILE_NAME_BYTES:
        return stem + ".png"
    digest = hashlib.sha256(stem.encode()).hexdigest()[:12]
    budget = _MAX_FILE_NAME_BYTES - len(".png") - len(digest) - 1
    return stem.encode()[:budget].decode("utf-8", "ignore") + "_" + digest + ".png"


# ----------------------------------------------------------------------------- the report


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class Report:
    """Scene records (scores or errors), their summary, and the report file (.json or .csv), written atomically."""

    def __init__(self, path: Path | None, settings: dict[str, Any]):
        if path is not None and path.suffix.lower() not in (".json", ".csv"):
            raise ValueError(f"--out must end in .json or .csv, got {path}")
        self.path, self.settings, self.scenes = path, settings, []
        self.provenance: dict[str, Any] = {}

    def add(self, name: str, files: Sequence[Path], score: float, pairs: list[tuple[int, int]],
            pair_scores: Sequence[float], overlaps: Sequence[float], low_overlap: Sequence[bool] | None = None,
            fingerprint: str | None = None) -> None:
        """Record a scored scene; `low_overlap` flags pairs left out of its score."""
        low_overlap = low_overlap or [False] * len(pairs)
        record = {
            "scene": name,
            "views": [str(f) for f in files],
            "fingerprint": fingerprint,
            "score": _finite(score),
            "pairs": [
                {"i": i, "j": j, "view_i": files[i].name, "view_j": files[j].name, "score": _finite(s), "overlap": o,
                 "low_overlap": bool(low)}
                for (i, j), s, o, low in zip(pairs, pair_scores, overlaps, low_overlap)
            ],
        }
        self.scenes.append(record)

    def add_error(self, name: str, files: Sequence[Path], error: BaseException | str,
                  fingerprint: str | None = None) -> None:
        """Record a scene that could not be scored (it is reported with its error, not scored)."""
        text = error if isinstance(error, str) else _error_text(error)
        self.scenes.append({"scene": name, "views": [str(f) for f in files], "fingerprint": fingerprint,
                            "score": None, "pairs": [], "error": text})

    def summary(self) -> dict[str, Any]:
        """Scene counts, mean score and the low-overlap count over the records."""
        scored = [s for s in self.scenes if "error" not in s]
        scores = [s["score"] for s in scored if s["score"] is not None]
        low = sum(p.get("low_overlap", False) for s in scored for p in s["pairs"])
        return {"num_scenes": len(self.scenes), "num_errors": len(self.scenes) - len(scored),
                "num_empty": len(scored) - len(scores), "num_low_overlap_pairs": low,
                "mean_score": sum(scores) / len(scores) if scores else None}

    def warnings(self) -> list[str]:
        """Human-readable warnings about the numbers (low-overlap pairs left out of the means)."""
        low = self.summary()["num_low_overlap_pairs"]
        if not low:
            return []
        return [f"{low} pair(s) overlap less than min_overlap={self.settings.get('min_overlap')} "
                f"and were left out of their scene's score"]

    def write(self, complete: bool) -> None:
        """Write the report through a temporary file and a rename (never half-written)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", newline="") as handle:
            if self.path.suffix.lower() == ".json":
                content = {"complete": complete, "settings": self.settings, **self.summary(),
                           "warnings": self.warnings(), "provenance": self.provenance, "scenes": self.scenes}
                json.dump(content, handle, indent=2)
            else:
                writer = csv.writer(handle)
                writer.writerow(["scene", "scene_score", "i", "j", "view_i", "view_j", "pair_score", "overlap",
                                 "low_overlap", "error"])
                for scene in self.scenes:
                    if "error" in scene:
                        writer.writerow([scene["scene"], "", "", "", "", "", "", "", "", scene["error"]])
                    for pair in scene["pairs"]:
                        writer.writerow([scene["scene"], scene["score"], pair["i"], pair["j"], pair["view_i"],
                                         pair["view_j"], pair["score"], pair["overlap"], pair["low_overlap"], ""])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.path)


def read_complete_flag(path: Path) -> bool:
    """Whether `path` holds a complete JSON report (a CSV report counts as complete)."""
    if not path.is_file():
        return False
    if path.suffix.lower() != ".json":
        return True
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except (ValueError, OSError):
        return False


class Journal:
    """Append-only record of this process's scored scenes (`<out>.journal.<rank>`).

    Every batch is flushed to the operating system at once (a killed process loses at most the batch in flight) and
    fsynced at most every `FSYNC_INTERVAL_S` seconds and on close (a power loss loses at most that much).
    """

    FSYNC_INTERVAL_S = 1.0

    def __init__(self, out: Path, rank: int, settings: dict[str, Any]):
        self.path = out.with_name(f"{out.name}.journal.{rank}")
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.handle = open(self.path, "a")
        self.synced = -math.inf
        if new:
            self._write([{"settings": settings}])

    def _write(self, entries: list[dict[str, Any]]) -> None:
        self.handle.write("".join(json.dumps(entry) + "\n" for entry in entries))
        self.handle.flush()
        if time.monotonic() - self.synced >= self.FSYNC_INTERVAL_S:
            os.fsync(self.handle.fileno())
            self.synced = time.monotonic()

    def append(self, records: list[dict[str, Any]]) -> None:
        """Add the records of one batch, durably."""
        if records:
            self._write([{"record": record} for record in records])

    def close(self) -> None:
        """Sync and close the file (it stays on disk for --resume)."""
        os.fsync(self.handle.fileno())
        self.handle.close()

    @staticmethod
    def paths(out: Path) -> list[Path]:
        """Every journal of report `out` (any number of processes)."""
        return sorted(out.parent.glob(glob.escape(out.name) + ".journal.*"))

    @staticmethod
    def read(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
        """Records of every journal of `out`; raises ValueError if one was written with other settings."""
        records = []
        for path in Journal.paths(out):
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # the line being written when the process was killed
                    continue
                if not isinstance(entry, dict):
                    raise ValueError(f"--resume: {path} is not a journal of met3r-diffusers score")
                if "settings" in entry:
                    _check_settings(entry["settings"], settings, path)
                elif isinstance(entry.get("record"), dict) and "scene" in entry["record"]:
                    records.append(entry["record"])
        return records


def _check_settings(stored: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    if not isinstance(stored, dict):
        raise ValueError(f"--resume: {source} is not a report or journal of met3r-diffusers score (bad settings)")
    current = json.loads(json.dumps(current))
    differences = [f"{key}: {stored.get(key)!r} there, {current.get(key)!r} now"
                   for key in sorted(set(stored) | set(current)) if stored.get(key) != current.get(key)]
    if differences:
        raise ValueError(f"--resume: {source} was scored with other settings ({'; '.join(differences)}); "
                         "rerun with those settings, or without --resume to start over")


def _record_key(record: dict[str, Any]) -> tuple[str, str | None]:
    return record["scene"], record.get("fingerprint")


def resume_records(out: Path, settings: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
    """Scored records of an earlier run (its JSON report, then its journals), keyed by (scene, fingerprint).

    Raises ValueError when the earlier run used other settings. Scenes recorded with an error are left out, so
    they are tried again.
    """
    records = []
    if out.suffix.lower() == ".json" and out.is_file():
        try:
            content = json.loads(out.read_text())
        except ValueError as error:
            raise ValueError(f"--resume: {out} is not a readable JSON report ({error})") from None
        if not isinstance(content, dict) or not isinstance(content.get("scenes", []), list):
            raise ValueError(f"--resume: {out} is not a report of met3r-diffusers score")
        _check_settings(content.get("settings", {}), settings, out)
        records.extend(r for r in content.get("scenes", []) if isinstance(r, dict) and "scene" in r)
    records.extend(Journal.read(out, settings))
    return {_record_key(r): r for r in records if "error" not in r and r.get("fingerprint")}


# ----------------------------------------------------------------------------- processes


class Processes:
    """This process's place in an `accelerate launch` run (one process without Accelerate or a launcher)."""

    def __init__(self, cpu: bool):
        self.state = None
        if importlib.util.find_spec("accelerate") is not None:
            from accelerate import PartialState

            self.state = PartialState(cpu=cpu)
        self.num_processes = self.state.num_processes if self.state else 1
        self.rank = self.state.process_index if self.state else 0
        self.is_main = self.rank == 0

    @property
    def device(self) -> torch.device:
        """Accelerate's device for this process (cuda:<local rank> or cpu)."""
        if self.state is not None:
            return self.state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def broadcast(self, value: Any) -> Any:
        """The main process's `value`, on every process."""
        if self.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def gather(self, values: list) -> list:
        """Concatenation of every process's list, in process order, on every process."""
        if self.num_processes == 1:
            return values
        from accelerate.utils import gather_object

        return gather_object(values)

    def barrier(self) -> None:
        """Wait for every process."""
        if self.num_processes > 1:
            self.state.wait_for_everyone()

    def close(self) -> None:
        """Leave the process group after the last collective call (gloo's threads otherwise abort at exit)."""
        if self.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- checks, metric, provenance


def _fail_if_unwritable(out: Path, option: str) -> None:
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:  # a real probe: permission bits do not tell for root, read-only mounts or full disks
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        tempfile.TemporaryFile(dir=folder).close()
        if out.exists():
            open(out, "a").close()
        out.parent.mkdir(parents=True, exist_ok=True)  # a missing folder is created (as `mkdir -p`)
    except OSError as error:
        raise UsageError(f"{option} {out}: cannot write there ({error})") from None


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad arguments with a one-line UsageError (exit 2) before any model loads."""
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.size is not None and args.size < _MULTIPLE:
        raise UsageError(f"--size must be at least {_MULTIPLE} (or 0 to keep the stored size)")
    if args.chunk_size < 0 or args.num_workers < 0:
        raise UsageError("--chunk-size and --num-workers must be >= 0")
    if not 0 <= args.min_overlap <= 1:
        raise UsageError(f"--min-overlap must be in [0, 1], got {args.min_overlap}")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise UsageError(f"--out {out} is a directory; give a file name ending in .json or .csv")
        if out.suffix.lower() not in (".json", ".csv"):
            raise UsageError(f"--out must end in .json or .csv, got {out}")
        _fail_if_unwritable(out, "--out")
    elif args.resume:
        raise UsageError("--resume needs --out (the report to resume)")
    if args.heatmaps and Path(args.heatmaps).exists() and not Path(args.heatmaps).is_dir():
        raise UsageError(f"--heatmaps {args.heatmaps} is a file; give a folder")
    if args.heatmaps:
        _fail_if_unwritable(Path(args.heatmaps) / "probe.png", "--heatmaps")
    device = args.device
    if device != "auto":
        try:
            device = torch.device(device)
        except RuntimeError as error:
            raise UsageError(f"--device {args.device}: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    package = _OPTIONAL_DISTANCE_PACKAGES.get(args.distance)
    if package and importlib.util.find_spec(package) is None:
        raise UsageError(f"--distance {args.distance} needs the {package} package (pip install {package})")
    if args.metric_factory and ":" not in args.metric_factory:
        raise UsageError(f"--metric-factory must be module:callable, got {args.metric_factory!r}")


def _load_factory(spec: str) -> Callable[[], Any]:
    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"--metric-factory {spec}: {error}") from None


def build_metric(args: argparse.Namespace) -> Any:
    """The metric the command scores with: `--metric-factory`'s, or MEt3R from the weights' arguments."""
    if args.metric_factory:
        return _load_factory(args.metric_factory)()
    from .hub import DEFAULT_REPO_IDS
    from .metric import MEt3R
    from .models import DUSt3R, MASt3R

    try:
        model_class = MASt3R if args.backbone == "mast3r" else DUSt3R
        geometry = model_class.from_pretrained(
            args.backbone_weights or DEFAULT_REPO_IDS[args.backbone], revision=args.revision,
            cache_dir=args.cache_dir, local_files_only=args.local_files_only or None,
        )
        return MEt3R(
            img_size=None, backbone=geometry, distance=args.distance, feature_backbone_weights=args.featup_weights,
            upsampler=args.upsampler, symmetric=args.symmetric, chunk_size=args.chunk_size or None,
            cache_dir=args.cache_dir, local_files_only=args.local_files_only or None, compile=args.compile,
        )
    except (FileNotFoundError, OSError, RuntimeError) as error:
        message = (
            f"met3r-diffusers: could not load the MEt3R weights: {error}\n"
            "The geometry network comes from the Hugging Face Hub (cached under HF_HOME) and the FeatUp "
            "checkpoint from its release URL (cached under TORCH_HOME). Without network access, run "
            "`met3r-diffusers download` on a machine that has it and copy those caches, or download the files "
            "elsewhere and point --backbone-weights at a local folder with config.json + model.safetensors (or a "
            "Naver .pth) and --featup-weights at the FeatUp .ckpt (also settable as MET3R_BACKBONE_WEIGHTS / "
            "MET3R_FEATUP_WEIGHTS)."
        )
        raise SystemExit(message) from None


def _file_entry(path: Path) -> dict[str, str]:
    from .hub import file_sha256

    logger.info("sha256 of %s", path)
    return {"path": str(path.resolve()), "sha256": file_sha256(path)}


def network_provenance(args: argparse.Namespace) -> dict[str, Any]:
    """Where each network's weights came from: hub id + resolved commit, or local path; sha256 of every file."""
    if args.metric_factory:
        return {"metric_factory": args.metric_factory}
    from . import hub
    from .models.featup import featup_checkpoint

    name = args.backbone_weights or hub.DEFAULT_REPO_IDS[args.backbone]
    path = Path(name).expanduser()
    if path.is_file():
        geometry: dict[str, Any] = {"local_path": str(path.resolve()), "files": {path.name: _file_entry(path)}}
    else:
        files = hub.resolve_files(name, revision=args.revision, cache_dir=args.cache_dir,
                                  local_files_only=args.local_files_only or None)
        entries = {file_name: _file_entry(file) for file_name, file in files.items()}
        if path.is_dir():
            geometry = {"local_path": str(path.resolve()), "files": entries}
        else:  # <cache>/models--*/snapshots/<commit>/<file>
            commit = next(iter(files.values())).parent.name
            geometry = {"hub_id": name, "requested_revision": args.revision or "main", "revision": commit,
                        "files": entries}
    networks = {"geometry": {"network": args.backbone, **geometry}}
    if args.distance == "cosine":
        weights = args.featup_weights or featup_checkpoint(True)[0]
        if Path(weights).expanduser().is_file():
            local = Path(weights).expanduser()
            networks["features"] = {"network": "dino16+" + args.upsampler, "local_path": str(local.resolve()),
                                    "files": {local.name: _file_entry(local)}}
        else:  # a URL: the cached copy the loader read
            cache_names = {featup_checkpoint(flag)[0]: featup_checkpoint(flag)[1] for flag in (True, False)}
            cached = hub.cached_download(weights, cache_names.get(weights), args.cache_dir, "FeatUp")
            networks["features"] = {"network": "dino16+" + args.upsampler, "url": weights,
                                    "files": {cached.name: _file_entry(cached)}}
    return networks


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("met3r-diffusers", "torch", "diffusers", "huggingface_hub", "accelerate", "torchmetrics"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return {"python": sys.version.split()[0], **found}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- loading and scoring


class SceneBatches(torch.utils.data.Dataset):
    """One item per planned batch: its scenes' views decoded and resized (in DataLoader workers with --num-workers).

    Item: (loaded, failed): `loaded` is a list of (scene indices, views (b, V, 3, H, W)) of equal shape, `failed`
    a list of (scene index, error text).
    """

    def __init__(self, scenes: Sequence[tuple[str, list[Path]]], batches: Sequence[Sequence[int]], size: int | None):
        self.scenes, self.batches, self.size = scenes, batches, size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, number: int) -> tuple[list[tuple[list[int], torch.Tensor]], list[tuple[int, str]]]:
        groups: list[tuple[list[int], list[torch.Tensor]]] = []
        failed: list[tuple[int, str]] = []
        for index in self.batches[number]:
            name, files = self.scenes[index]
            try:
                if len(files) < 2:
                    raise ValueError(f"{name}: a scene needs at least 2 views, found {len(files)}")
                views = load_views(files, self.size)
            except Exception as error:  # noqa: BLE001 - any unreadable scene is reported, never fatal
                failed.append((index, _error_text(error)))
                continue
            if groups and groups[-1][1][0].shape == views.shape:
                groups[-1][0].append(index)
                groups[-1][1].append(views)
            else:
                groups.append(([index], [views]))
        return [(indices, torch.stack(tensors)) for indices, tensors in groups], failed


def _identity(item: Any) -> Any:
    return item


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the metric for cores


class Scorer:
    """Runs the metric on batches and turns its output into report records (scores, low-overlap flags, heatmaps)."""

    def __init__(self, metric: Any, args: argparse.Namespace, device: torch.device, heatmaps: Path | None):
        self.metric, self.args, self.device, self.heatmaps = metric, args, device, heatmaps
        self.metric_seconds = 0.0

    def __call__(self, views: torch.Tensor) -> Any:
        """The metric's output for views (b, V, 3, H, W)."""
        start = time.perf_counter()
        wants_maps = self.heatmaps is not None
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            output = self.metric(views.to(self.device), pairs=self.args.pairs, return_score_map=wants_maps,
                                 return_overlap_mask=wants_maps)
        self.metric_seconds += time.perf_counter() - start
        return output

    def record(self, report: Report, index: int, scene: tuple[str, list[Path]], fingerprint: str,
               views: torch.Tensor, output: Any, b: int, low: torch.Tensor, scores: torch.Tensor) -> None:
        """Add sample `b` of `output` to the report (and write its heatmaps)."""
        name, files = scene
        if self.heatmaps is not None:  # first: a scene whose heatmaps fail is reported as failed, not as scored
            _write_heatmaps(self.heatmaps, index, name, files, views[b], output, b, self.args.distance)
        report.add(name, files, float(scores[b]), output.pairs, output.pair_scores[b].tolist(),
                   output.overlap_fraction[b].tolist(), low[b].tolist(), fingerprint)

    def flags(self, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-overlap flags (b, P) and the per-scene scores without those pairs (b,)."""
        fraction = output.overlap_fraction.float().cpu()
        low = fraction < self.args.min_overlap
        if not bool(low.any()):
            return low, output.score.float().cpu()
        pair_scores = output.pair_scores.float().cpu()
        valid = output.valid.cpu() if output.valid is not None else torch.isfinite(pair_scores)
        return low, sample_scores(pair_scores, valid & ~low)


def _write_heatmaps(folder: Path, index: int, name: str, files: Sequence[Path], views: torch.Tensor, out, b: int,
                    distance: str) -> None:
    """One PNG per pair, named by `heatmap_name` (the scene number keeps names unique)."""
    maps = out.score_map[b].reshape(-1, *out.score_map.shape[-2:])
    masks = out.overlap_mask[b].reshape(-1, *out.overlap_mask.shape[-2:])
    for (i, j), score_map, mask in zip(out.pairs, maps, masks):
        picture = heatmap_overlay(views[i], dissimilarity(distance, score_map), mask)
        Image.fromarray(picture).save(folder / heatmap_name(index, name, files[i].stem, files[j].stem))


def _score_batch(scorer: Scorer, report: Report, scenes, fingerprints, indices: list[int], views: torch.Tensor) -> None:
    """Score one batch into the report; if it fails, each scene alone, so that one bad scene fails only itself."""
    try:
        output = scorer(views)
        low, scores = scorer.flags(output)
    except Exception as error:  # noqa: BLE001 - per-scene isolation
        if len(indices) == 1:
            print(f"met3r-diffusers: {scenes[indices[0]][0]} failed: {_error_text(error)}", file=sys.stderr)
            report.add_error(*scenes[indices[0]], error, fingerprints[indices[0]])
            return
        for b, index in enumerate(indices):
            _score_batch(scorer, report, scenes, fingerprints, [index], views[b : b + 1])
        return
    for b, index in enumerate(indices):
        try:
            scorer.record(report, index, scenes[index], fingerprints[index], views, output, b, low, scores)
        except Exception as error:  # noqa: BLE001 - e.g. a heatmap that cannot be written
            print(f"met3r-diffusers: {scenes[index][0]} failed: {_error_text(error)}", file=sys.stderr)
            report.add_error(*scenes[index], error, fingerprints[index])


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    values = {"pairs": args.pairs, "size": args.size, "backbone": args.backbone, "distance": args.distance,
              "upsampler": args.upsampler, "bf16": args.bf16, "symmetric": args.symmetric,
              "min_overlap": args.min_overlap, "chunk_size": args.chunk_size,
              "backbone_weights": args.backbone_weights, "featup_weights": args.featup_weights,
              "revision": args.revision, "metric_factory": args.metric_factory}
    return {key: values[key] for key in SCORING_SETTINGS}


def score_command(args: argparse.Namespace) -> int:
    """Run `met3r-diffusers score`; returns the exit code (see the module docstring)."""
    from tqdm.auto import tqdm

    started = _now()
    check_arguments(args)
    try:
        scenes = find_scenes(args.paths, check_views=False)
    except ValueError as error:
        raise UsageError(str(error)) from None
    out = Path(args.out) if args.out else None
    settings = _settings(args)
    processes = Processes(cpu=args.device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower()
                          in ("1", "true", "yes"))
    device = processes.device if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda" and device.index is None and processes.num_processes > 1:
        device = processes.device

    # the main process decides what is left to score; every process gets its answer (or the error)
    kept: dict = {}
    if processes.is_main and out is not None:
        if args.resume:
            try:
                kept = resume_records(out, settings)
            except ValueError as error:
                kept = {"error": str(error)}
        else:
            for journal in Journal.paths(out):
                journal.unlink()
    kept = processes.broadcast(kept)
    if "error" in kept:
        raise UsageError(kept["error"])
    fingerprints = [scene_fingerprint(files) for _, files in scenes]
    done = {index for index, (name, _) in enumerate(scenes) if (name, fingerprints[index]) in kept}
    batches = [[k for k in batch if k not in done] for batch in plan_batches(scenes, args.size, args.batch_size)]
    batches = [batch for batch in batches if batch]
    mine = [batches[n] for n in shard_batches(batches, [len(f) for _, f in scenes], processes.num_processes)
            [processes.rank]]

    heatmaps = Path(args.heatmaps) if args.heatmaps else None
    if heatmaps is not None:
        heatmaps.mkdir(parents=True, exist_ok=True)
    metric = build_metric(args)
    if isinstance(metric, torch.nn.Module):  # --bf16: weights stored in bfloat16 and run under autocast
        metric = metric.to(device, dtype=torch.bfloat16 if args.bf16 else None)
    report = Report(out, settings)
    scorer = Scorer(metric, args, device, heatmaps)
    journal = Journal(out, processes.rank, settings) if out is not None else None
    processes.barrier()  # the journals are cleared (or read) before anyone appends
    loader = torch.utils.data.DataLoader(
        SceneBatches(scenes, mine, args.size), batch_size=None, collate_fn=_identity, num_workers=args.num_workers,
        worker_init_fn=_single_thread_worker if args.num_workers else None,
    )
    total = sum(len(batch) for batch in mine)
    progress = tqdm(total=total, unit="scene", desc="MEt3R", disable=args.quiet or not processes.is_main)
    loop_start, complete = time.perf_counter(), False
    try:
        for loaded, failed in loader:
            start = len(report.scenes)
            for index, error in failed:
                print(f"met3r-diffusers: skipping {scenes[index][0]}: {error}", file=sys.stderr)
                report.add_error(*scenes[index], error, fingerprints[index])
            for indices, views in loaded:
                _score_batch(scorer, report, scenes, fingerprints, indices, views)
            if journal is not None:
                journal.append(report.scenes[start:])
            progress.update(len(report.scenes) - start)
        complete = True
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(report.scenes)} of {total} scenes scored by this process; "
              + ("rerun with --resume to score the rest" if out else ""), file=sys.stderr)
    finally:  # also on an unexpected error: what was scored stays on disk (journal and report)
        progress.close()
        if journal is not None:
            journal.close()
        timing = {"loop_s": time.perf_counter() - loop_start, "metric_s": scorer.metric_seconds,
                  "num_views": sum(len(scenes[k][1]) for batch in mine for k in batch)}
        if complete:
            records, timings = processes.gather(report.scenes), processes.gather([timing])
            processes.close()
        else:  # no collective calls: the other processes may be gone; their journals hold their scenes
            records = report.scenes + (Journal.read(out, settings) if out is not None else [])
            timings = [timing]
        if processes.is_main:
            final = _merge(out, settings, scenes, fingerprints, kept, records)
            final.provenance = _provenance(args, device, processes, started, timings)
            written = _finish(final, out, complete)
    if not processes.is_main:
        return EXIT_OK if complete else EXIT_INTERRUPTED
    return _summarise(final, args, complete, written)


def _merge(out, settings, scenes, fingerprints, kept, records) -> Report:
    """One report in scene order from the kept records and this run's (every process's) records."""
    by_key = dict(kept)
    by_key.update({_record_key(r): r for r in records})
    final = Report(out, settings)
    for index, (name, _) in enumerate(scenes):
        record = by_key.get((name, fingerprints[index]))
        if record is not None:
            final.scenes.append(record)
    return final


def _provenance(args, device, processes, started, timings) -> dict[str, Any]:
    try:
        networks = network_provenance(args)
    except (OSError, ValueError) as error:  # the report still gets written
        networks = {"error": _error_text(error)}
    return {
        "versions": _versions(), "device": str(device), "dtype": "bfloat16" if args.bf16 else "float32",
        "num_processes": processes.num_processes, "networks": networks,
        "run": {"paths": list(args.paths), "batch_size": args.batch_size, "num_workers": args.num_workers,
                "heatmaps": args.heatmaps, "resume": args.resume, "cache_dir": args.cache_dir,
                "local_files_only": args.local_files_only, "requested_device": args.device},
        "start_time": started, "end_time": _now(),
        "timing": {key: sum(t[key] for t in timings) for key in ("metric_s", "num_views")}
                  | {"loop_s": max(t["loop_s"] for t in timings)},
    }


def _finish(final: Report, out: Path | None, complete: bool) -> bool:
    """Write the merged report, unless that would replace a complete report by a partial one; whether it was written."""
    if out is None:
        return False
    if not complete and read_complete_flag(out):
        print(f"met3r-diffusers: kept the complete report {out}; this run's scenes are in its journal "
              "(--resume continues from them)", file=sys.stderr)
        return False
    final.write(complete=complete)
    if complete and out.suffix.lower() == ".json":  # the report holds everything: the journals are redundant
        for journal in Journal.paths(out):
            journal.unlink()
    return True


def _summarise(report: Report, args: argparse.Namespace, complete: bool, written: bool) -> int:
    summary = report.summary()
    mean = summary["mean_score"]
    if args.out and not written:  # interrupted over a complete report, which was kept as it was
        where = f", this interrupted run only (not written; {args.out} keeps the earlier complete report)"
    else:
        where = f", report: {args.out}" if args.out else ""
    print(f"{summary['num_scenes']} scenes, mean MEt3R {'n/a' if mean is None else f'{mean:.4f}'}"
          + (f" ({summary['num_empty']} without overlap)" if summary["num_empty"] else "")
          + (f", {summary['num_errors']} failed" if summary["num_errors"] else "")
          + where)
    for warning in report.warnings():
        print(f"met3r-diffusers: warning: {warning}", file=sys.stderr)
    if not args.out:
        for scene in report.scenes:
            print(f"{scene['scene']}\t{scene['score']}")
    if not complete:
        return EXIT_INTERRUPTED
    return EXIT_FAILED_SCENES if summary["num_errors"] else EXIT_OK


def download_command(args: argparse.Namespace) -> int:
    """Run `met3r-diffusers download`: fetch the default weights into the caches and print what was fetched."""
    from .hub import download_weights

    try:
        fetched = download_weights(backbone=args.backbone, use_norm=not args.no_norm, cache_dir=args.cache_dir,
                                   revision=args.revision)
    except (FileNotFoundError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"met3r-diffusers: download failed: {first_line}", file=sys.stderr)
        return EXIT_WEIGHTS
    text = json.dumps(fetched, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"{len(fetched)} files fetched, list: {args.out}")
    else:
        print(text)
    return EXIT_OK


# ----------------------------------------------------------------------------- parser


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The `met3r-diffusers` argument parser."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="met3r-diffusers", description="MEt3R multi-view consistency.",
                                     formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser(
        "score", help="score folders of views (MEt3R: lower = more consistent)", formatter_class=formatter,
        description="Score folders of views. Exit status: 0 all scenes scored, 1 weights not loadable, 2 bad "
                    "arguments, 3 some scenes failed (see the report), 130 interrupted.")
    score.add_argument("paths", nargs="+", metavar="PATH", help="folder of views, folder of scene folders, or glob")
    score.add_argument("--pairs", default="adjacent", choices=PAIR_MODES, help="view pairs to score")
    score.add_argument("--symmetric", action="store_true", help="score each pair in both directions and average")
    score.add_argument("--size", type=int, default=256,
                       help="resize the short side to this many pixels (0 keeps the stored size)")
    score.add_argument("--batch-size", type=int, default=1, help="scenes per forward pass")
    score.add_argument("--chunk-size", type=int, default=2,
                       help="MEt3R chunk_size: views / pair rows per network call (0 = all at once)")
    score.add_argument("--num-workers", type=int, default=0,
                       help="DataLoader workers decoding and resizing images while the metric runs (0 = inline)")
    score.add_argument("--min-overlap", type=float, default=DEFAULT_MIN_OVERLAP,
                       help="pairs overlapping less are flagged low_overlap and left out of the scene score")
    score.add_argument("--device", default="auto",
                       help="auto = Accelerate's device for this process (cuda:<local rank> if CUDA, else cpu)")
    score.add_argument("--out", help="report file, .json or .csv")
    score.add_argument("--resume", action="store_true",
                       help="keep the scenes already in --out (and its journals) and score only the rest")
    score.add_argument("--heatmaps", metavar="DIR", help="write one score-map PNG per pair here")
    score.add_argument("--backbone", default="mast3r", choices=("mast3r", "dust3r"), help="geometry network")
    score.add_argument("--distance", default="cosine", choices=DISTANCES,
                       help="cosine on DINO/FeatUp features (MEt3R), or one on RGB (psnr/ssim: higher = consistent)")
    score.add_argument("--upsampler", default="featup", choices=("featup", "bilinear", "nearest", "bicubic"),
                       help="feature upsampler: FeatUp's JBU stack (MEt3R) or a weight-free resize")
    score.add_argument("--backbone-weights", default=os.environ.get("MET3R_BACKBONE_WEIGHTS"),
                       help="hub id, local folder or .pth of the geometry network (env MET3R_BACKBONE_WEIGHTS; "
                            "None = the default hub id of --backbone)")
    score.add_argument("--featup-weights", default=os.environ.get("MET3R_FEATUP_WEIGHTS"),
                       help="local path or URL of the FeatUp checkpoint (env MET3R_FEATUP_WEIGHTS; None = official)")
    score.add_argument("--revision", default=None, help="branch, tag or commit of the geometry hub repo (None = main)")
    score.add_argument("--cache-dir", default=None,
                       help="download cache for the hub files and the FeatUp checkpoint (None = HF / torch defaults)")
    score.add_argument("--local-files-only", action="store_true", help="never download; use the caches only")
    score.add_argument("--bf16", action="store_true",
                       help="networks in bfloat16 under autocast: faster, half the memory; rendering and "
                            "score stay float32 (not bit-comparable with float32)")
    score.add_argument("--compile", action="store_true",
                       help="torch.compile the network blocks (opt-in; minutes of compilation first, same scores "
                            "within float rounding; eager with a warning where inductor cannot run)")
    score.add_argument("--metric-factory", default=os.environ.get(FACTORY_ENV), metavar="MODULE:CALLABLE",
                       help=f"for tests and custom metrics: a zero-argument callable returning a metric with MEt3R's "
                            f"call signature, used instead of the weights' arguments (env {FACTORY_ENV})")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    download = commands.add_parser(
        "download", formatter_class=formatter,
        help="fetch the default weights into the caches (for an offline machine); prints path, sha256, source")
    download.add_argument("--backbone", default="mast3r", choices=("mast3r", "dust3r"), help="geometry network")
    download.add_argument("--no-norm", action="store_true", help="FeatUp's checkpoint without ChannelNorm")
    download.add_argument("--cache-dir", default=None, help="cache for the hub files and the FeatUp checkpoint")
    download.add_argument("--revision", default=None, help="branch, tag or commit of the geometry hub repo")
    download.add_argument("--out", help="write the JSON here instead of printing it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `met3r-diffusers` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "download":
        return download_command(args)
    if args.size == 0:
        args.size = None
    return score_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
