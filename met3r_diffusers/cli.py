"""`met3r-diffusers` command line: score folders of generated views with MEt3R.

    met3r-diffusers score out/scene_a out/scene_b --pairs all --out report.json --heatmaps maps/
    met3r-diffusers score "samples/*" --size 256 --batch-size 4 --out report.csv

A PATH is a folder of views (sorted by name, numbers compared as numbers), a folder of such folders,
or a glob matching either folders (one scene each) or image files (one scene). The report holds one
score per scene and per pair; it is rewritten after every batch, so an interrupted run (Ctrl-C)
keeps everything scored so far. Weights come from the Hugging Face cache / hub, or from local
checkpoints given with --backbone-weights / --featup-weights (or the environment variables
MET3R_BACKBONE_WEIGHTS / MET3R_FEATUP_WEIGHTS).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import IMAGE_EXTENSIONS, natural_key, load_image, read_image_size
from .distances import DISTANCES, dissimilarity
from .pairs import PAIR_MODES

_MULTIPLE = 16  # DUSt3R and DINO need image sides that are multiples of the 16-pixel patch


def _images_in(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def find_scenes(paths: Sequence[str]) -> list[tuple[str, list[Path]]]:
    """Expand PATH arguments into (scene name, ordered view files); raises ValueError for unusable paths.

    An existing path is taken literally (even with glob characters in its name); otherwise it is a glob,
    whose folders without images are skipped with a warning. A scene given twice is scored once.
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
    for name, views in scenes:
        if len(views) < 2:
            raise ValueError(f"{name}: a scene needs at least 2 views, found {len(views)}")
    return scenes


def load_views(files: Sequence[Path], size: int | None) -> torch.Tensor:
    """Read views as (V, 3, H, W) in [-1, 1]: the short side resized to `size` (LANCZOS), then a centre
    crop to multiples of 16. Without `size` the views keep their size (cropped to multiples of 16)."""
    images = []
    for path in files:
        target = None
        if size is not None:
            stored_height, stored_width = read_image_size(path)
            scale = size / min(stored_height, stored_width)
            target = (max(round(stored_height * scale), size), max(round(stored_width * scale), size))
        image = load_image(path, target, Image.LANCZOS)
        full_height, full_width = image.shape[1:]
        width, height = (full_width // _MULTIPLE) * _MULTIPLE, (full_height // _MULTIPLE) * _MULTIPLE
        if min(width, height) == 0:
            raise ValueError(f"{path}: {full_width}x{full_height} is smaller than {_MULTIPLE} pixels")
        left, top = (full_width - width) // 2, (full_height - height) // 2
        images.append(image[:, top : top + height, left : left + width])
    if len({a.shape for a in images}) != 1:
        shapes = sorted({f"{a.shape[2]}x{a.shape[1]}" for a in images})
        raise ValueError(f"views of one scene must share a size (got {', '.join(shapes)}); pass --size to resize")
    return torch.stack(images)


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


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Report:
    """Scores collected so far, rewritten to disk (atomically) after every batch."""

    def __init__(self, path: Path | None, settings: dict[str, Any]):
        if path is not None and path.suffix.lower() not in (".json", ".csv"):
            raise ValueError(f"--out must end in .json or .csv, got {path}")
        self.path, self.settings, self.scenes = path, settings, []

    def add(self, name: str, files: Sequence[Path], score: float, pairs: list[tuple[int, int]],
            pair_scores: Sequence[float], overlaps: Sequence[float]) -> None:
        self.scenes.append({
            "scene": name,
            "views": [str(f) for f in files],
            "score": _finite(score),
            "pairs": [
                {"i": i, "j": j, "view_i": files[i].name, "view_j": files[j].name, "score": _finite(s), "overlap": o}
                for (i, j), s, o in zip(pairs, pair_scores, overlaps)
            ],
        })

    def add_error(self, name: str, files: Sequence[Path], error: Exception) -> None:
        """Record a scene that could not be read (it is reported, not scored)."""
        self.scenes.append({"scene": name, "views": [str(f) for f in files], "score": None, "pairs": [],
                            "error": f"{type(error).__name__}: {error}"})

    def summary(self) -> dict[str, Any]:
        scored = [s for s in self.scenes if "error" not in s]
        scores = [s["score"] for s in scored if s["score"] is not None]
        return {"num_scenes": len(self.scenes), "num_errors": len(self.scenes) - len(scored),
                "num_empty": len(scored) - len(scores), "mean_score": sum(scores) / len(scores) if scores else None}

    def write(self, complete: bool) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "w", newline="") as handle:
            if self.path.suffix.lower() == ".json":
                content = {"complete": complete, "settings": self.settings, **self.summary(), "scenes": self.scenes}
                json.dump(content, handle, indent=2)
            else:
                writer = csv.writer(handle)
                writer.writerow(["scene", "scene_score", "i", "j", "view_i", "view_j", "pair_score", "overlap", "error"])
                for scene in self.scenes:
                    if "error" in scene:
                        writer.writerow([scene["scene"], "", "", "", "", "", "", "", scene["error"]])
                    for pair in scene["pairs"]:
                        writer.writerow([scene["scene"], scene["score"], pair["i"], pair["j"], pair["view_i"],
                                         pair["view_j"], pair["score"], pair["overlap"], ""])
        os.replace(partial, self.path)


def _batches(scenes: list[tuple[str, list[Path]]], size: int | None, batch_size: int, report: Report
             ) -> Iterator[tuple[list[tuple[str, list[Path]]], torch.Tensor]]:
    """Consecutive scenes of equal shape, up to `batch_size` at a time, with their views (b, V, 3, H, W).
    Scenes that cannot be read are recorded in the report and skipped."""
    group: list[tuple[str, list[Path]]] = []
    tensors: list[torch.Tensor] = []
    for scene in scenes:
        try:
            views = load_views(scene[1], size)
        except (ValueError, OSError) as error:
            print(f"met3r-diffusers: skipping {scene[0]}: {error}", file=sys.stderr)
            report.add_error(*scene, error)
            continue
        if tensors and (views.shape != tensors[0].shape or len(group) == batch_size):
            yield group, torch.stack(tensors)
            group, tensors = [], []
        group.append(scene)
        tensors.append(views)
    if group:
        yield group, torch.stack(tensors)


def _build_metric(args: argparse.Namespace):
    from .metric import MEt3R

    try:
        return MEt3R(
            img_size=None, backbone=args.backbone, distance=args.distance, backbone_weights=args.backbone_weights,
            feature_backbone_weights=args.featup_weights, upsampler=args.upsampler,
        )
    except (FileNotFoundError, OSError, RuntimeError) as error:
        raise SystemExit(
            f"met3r-diffusers: could not load the MEt3R weights: {error}\n"
            "The geometry network comes from the Hugging Face Hub (cached under HF_HOME) and the FeatUp "
            "checkpoint from its release URL (cached under TORCH_HOME). Without network access, copy those "
            "caches from a machine that has run this command once, or download the files elsewhere and point "
            "--backbone-weights at a local folder with config.json + model.safetensors (or a Naver .pth) and "
            "--featup-weights at the FeatUp .ckpt (also settable as MET3R_BACKBONE_WEIGHTS / "
            "MET3R_FEATUP_WEIGHTS)."
        ) from None


def score_command(args: argparse.Namespace) -> int:
    """Run `met3r-diffusers score`; returns the exit code."""
    from tqdm.auto import tqdm

    if args.batch_size < 1:
        raise SystemExit("met3r-diffusers: --batch-size must be at least 1")
    if args.size is not None and args.size < _MULTIPLE:
        raise SystemExit(f"met3r-diffusers: --size must be at least {_MULTIPLE}")
    try:
        scenes = find_scenes(args.paths)
        report = Report(Path(args.out) if args.out else None, {
            "pairs": args.pairs, "size": args.size, "backbone": args.backbone, "distance": args.distance,
            "upsampler": args.upsampler, "bf16": args.bf16,
        })
    except ValueError as error:
        raise SystemExit(f"met3r-diffusers: {error}") from None
    heatmaps = Path(args.heatmaps) if args.heatmaps else None
    if heatmaps is not None:
        heatmaps.mkdir(parents=True, exist_ok=True)
    # --bf16: weights stored in bfloat16 (half the memory, no cast per call) and run under autocast
    metric = _build_metric(args).to(args.device, dtype=torch.bfloat16 if args.bf16 else None)
    progress = tqdm(total=len(scenes), unit="scene", desc="MEt3R", disable=args.quiet)
    complete = False
    try:
        for group, views in _batches(scenes, args.size, args.batch_size, report):
            device_type = torch.device(args.device).type
            with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.bf16):
                out = metric(views.to(args.device), pairs=args.pairs,
                             return_score_map=heatmaps is not None, return_overlap_mask=heatmaps is not None)
            for b, (name, files) in enumerate(group):
                report.add(name, files, float(out.score[b]), out.pairs, out.pair_scores[b].tolist(),
                           out.overlap_fraction[b].tolist())
                if heatmaps is not None:
                    _write_heatmaps(heatmaps, len(report.scenes) - 1, name, files, views[b], out, b, args.distance)
            report.write(complete=False)
            progress.update(len(group))
        complete = True
        progress.update(len(scenes) - progress.n)  # scenes that could not be read
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(report.scenes)} of {len(scenes)} scenes scored", file=sys.stderr)
    finally:  # also on an unexpected error: what was scored stays on disk
        progress.close()
        report.write(complete=complete)
    summary = report.summary()
    mean = summary["mean_score"]
    print(f"{summary['num_scenes']} scenes, mean MEt3R {'n/a' if mean is None else f'{mean:.4f}'}"
          + (f" ({summary['num_empty']} without overlap)" if summary["num_empty"] else "")
          + (f", {summary['num_errors']} unreadable" if summary["num_errors"] else "")
          + (f", report: {args.out}" if args.out else ""))
    if not args.out:
        for scene in report.scenes:
            print(f"{scene['scene']}\t{scene['score']}")
    return 0 if complete else 130


def _write_heatmaps(folder: Path, index: int, name: str, files: Sequence[Path], views: torch.Tensor, out, b: int,
                    distance: str) -> None:
    """One PNG per pair, named `<scene number>_<scene>_<view i>_<view j>.png` (the number keeps names unique)."""
    maps = out.score_map[b].reshape(-1, *out.score_map.shape[-2:])
    masks = out.overlap_mask[b].reshape(-1, *out.overlap_mask.shape[-2:])
    scene = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).stem or name)
    for (i, j), score_map, mask in zip(out.pairs, maps, masks):
        picture = heatmap_overlay(views[i], dissimilarity(distance, score_map), mask)
        Image.fromarray(picture).save(folder / f"{index:04d}_{scene}_{files[i].stem}_{files[j].stem}.png")


def build_parser() -> argparse.ArgumentParser:
    """The `met3r-diffusers` argument parser."""
    parser = argparse.ArgumentParser(prog="met3r-diffusers", description="MEt3R multi-view consistency.")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score folders of views (MEt3R: lower = more consistent)")
    score.add_argument("paths", nargs="+", metavar="PATH", help="folder of views, folder of scene folders, or glob")
    score.add_argument("--pairs", default="adjacent", choices=PAIR_MODES, help="view pairs to score")
    score.add_argument("--size", type=int, default=256,
                       help="resize the short side to this many pixels (0 keeps the stored size)")
    score.add_argument("--batch-size", type=int, default=1, help="scenes per forward pass")
    score.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    score.add_argument("--out", help="report file, .json or .csv")
    score.add_argument("--heatmaps", metavar="DIR", help="write one score-map PNG per pair here")
    score.add_argument("--backbone", default="mast3r", choices=("mast3r", "dust3r"))
    score.add_argument("--distance", default="cosine", choices=DISTANCES,
                       help="cosine on DINO/FeatUp features (MEt3R), or one on RGB (psnr/ssim: higher = consistent)")
    score.add_argument("--upsampler", default="featup", choices=("featup", "bilinear", "nearest", "bicubic"))
    score.add_argument("--backbone-weights", default=os.environ.get("MET3R_BACKBONE_WEIGHTS"),
                       help="hub id, local folder or .pth of the geometry network")
    score.add_argument("--featup-weights", default=os.environ.get("MET3R_FEATUP_WEIGHTS"),
                       help="local path or URL of the FeatUp checkpoint")
    score.add_argument("--bf16", action="store_true",
                       help="networks in bfloat16 under autocast: faster, half the memory; rendering and "
                            "score stay float32 (not bit-comparable with float32)")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `met3r-diffusers` console script."""
    args = build_parser().parse_args(argv)
    if args.size == 0:
        args.size = None
    return score_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
