"""Multi-view training data: a folder-per-scene dataset loader and a procedural toy dataset generator.

Dataset format (one folder per scene under a root folder)::

    root/
      scene_0000/
        view_00.png  view_01.png  ...   ordered views (any of .png .jpg .jpeg .webp; sorted by name,
                                        numbers compared as numbers, so view_2 < view_10)
        prompt.txt                      optional: the scene's text prompt (one line; "" when absent)
        cameras.json                    optional: {"intrinsics": [V x 3x3], "cam_to_world": [V x 4x4]}
      scene_0001/
        ...

Views are read by `load_image` (also the CLI's reader): full bit depth (16-bit PNGs included), EXIF orientation
applied, alpha composited over white; see docs/data.md for the formats, limits and errors.
All views of a scene must share one size; without `resolution` all scenes must too. Intrinsics are in pixels
of the stored images (OpenCV convention: +x right, +y down, +z forward) and are rescaled when `resolution`
resizes the views. `make_toy_multiview_dataset` writes such a folder with procedural scenes (a textured floor,
spheres and boxes) ray-cast from cameras on an arc around the scene by a small pure-PyTorch renderer.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import re
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .validation import check_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
PROMPT_FILE = "prompt.txt"
CAMERAS_FILE = "cameras.json"

# Pillow decodes 16-bit colour PNGs to 8 bits (it keeps each sample's high byte). Decoding the same data
# again with another unpacker recovers the rest; the zip decoder's filtering does not depend on it.
_WIDE_PNG_RAWMODES = {
    "RGB;16B": "RGB;16L",  # the little-endian unpacker keeps the low bytes of big-endian samples
    "RGBA;16B": "RGBA;16L",
    "LA;16B": "RGBA",  # 4 bytes per pixel like 8-bit RGBA, whose unpacker keeps them all: L hi, L lo, A hi, A lo
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's 16-bit greyscale (I: 32-bit ints)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@contextlib.contextmanager
def _image_errors(path: Path) -> Iterator[None]:
    """Re-raise Pillow's errors for a file that cannot or must not be decoded as ValueError naming the file."""
    try:
        yield
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"{path}: refusing to decode it, a possible decompression bomb ({error}); raise PIL.Image.MAX_IMAGE_PIXELS "
            "(or set it to None) to read it anyway"
        ) from error
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as error:
        reason = f"{type(error).__name__}: {error}"
        raise ValueError(f"{path}: not a readable image, corrupt or truncated ({reason})") from error


def _open(path: Path) -> Image.Image:
    """Image.open refusing more than PIL.Image.MAX_IMAGE_PIXELS pixels (Pillow only warns up to twice that)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise Image.DecompressionBombError(
            f"{image.width}x{image.height} = {image.width * image.height:,} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS "
            f"= {limit:,}"
        )
    return image


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1-8, 1 when absent or invalid) known before the pixels are decoded."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # an eXIf chunk after the pixel data is not read (that would decode the whole image)
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to (H, W, C) samples, as PIL.ImageOps.exif_transpose does."""
    if orientation in _TRANSPOSED_ORIENTATIONS:
        array = array.swapaxes(0, 1)  # transpose: 5 as is, 6 / 7 / 8 also flip one or both axes
    flip_rows = orientation in (3, 4, 7, 8)
    flip_cols = orientation in (2, 3, 6, 7)
    return array[:: -1 if flip_rows else 1, :: -1 if flip_cols else 1]


def _repacked_png(path: Path, rawmode: str) -> np.ndarray:
    """The pixels of a PNG decoded with another Pillow unpacker (same bits per pixel)."""
    with _open(path) as image:
        image.tile = [(*tile[:3], rawmode) for tile in image.tile]
        image.load()
        return np.asarray(image)


def _samples(path: Path, image: Image.Image) -> tuple[np.ndarray, int]:
    """Integer samples (H, W, C) with C = 1 (grey), 2 (grey, alpha), 3 (RGB) or 4 (RGBA), and their full scale."""
    rawmode = image.tile[0][3] if image.format == "PNG" and len(image.tile) == 1 else None
    if rawmode in _WIDE_PNG_RAWMODES:
        other = _repacked_png(path, _WIDE_PNG_RAWMODES[rawmode]).astype(np.uint16)
        if rawmode == "LA;16B":
            return np.stack([other[..., 0] * 256 + other[..., 1], other[..., 2] * 256 + other[..., 3]], -1), 65535
        return np.asarray(image).astype(np.uint16) * 256 + other, 65535
    if image.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image).clip(0, 65535)[..., None], 65535
    if image.mode == "CMYK":  # (1 - C)(1 - K) etc., exactly, on the scale 255 * 255
        cmyk = np.asarray(image).astype(np.int32)
        return (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]), 255 * 255
    if image.mode in ("L", "LA", "RGB", "RGBA") and "transparency" not in image.info:
        array = np.asarray(image)
        return (array[..., None] if array.ndim == 2 else array), 255
    # Palette, 1-bit, premultiplied, colour-keyed and other colour spaces: Pillow's conversion is exact here.
    has_alpha = "transparency" in image.info or "A" in image.mode or "a" in image.mode
    return np.asarray(image.convert("RGBA" if has_alpha else "RGB")), 255


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file as `load_image` returns it (EXIF orientation applied), reading only its header."""
    path = Path(path)
    with _image_errors(path), _open(path) as image:
        transposed = _orientation(image) in _TRANSPOSED_ORIENTATIONS
        width, height = image.size
    return (width, height) if transposed else (height, width)


def load_image(
    path: str | Path, size: int | Sequence[int] | None = None, resample: int = Image.BICUBIC
) -> torch.Tensor:
    """Decode an image file to (3, H, W) float32 in [-1, 1] at its full bit depth (see docs/data.md).

    Args:
        path: a PNG, JPEG or WebP file (any format Pillow reads).
        size: resize to this (H, W) (an int for a square) with `resample`; `None` keeps the size.
        resample: a PIL resampling filter.

    16-bit PNGs keep their 16 bits, greyscale becomes R = G = B, CMYK is converted as (1 - C)(1 - K), palette
    images through their palette, the EXIF orientation is applied, and alpha (or a transparent colour) is
    composited over white. 8-bit images without alpha give exactly what ``image.convert("RGB")`` gave.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: naming the file, when it is not a readable image (corrupt, truncated, unknown format), or
            has more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (a possible decompression bomb).
    """
    path = Path(path)
    target = _as_size(size)
    with _image_errors(path), _open(path) as image:
        orientation = _orientation(image)
        samples, full_scale = _samples(path, image)
    samples = _orient(samples, orientation)
    if full_scale == 255 and samples.shape[-1] in (1, 3):  # plain 8-bit: resized in 8 bits, as before
        pil = Image.fromarray(np.ascontiguousarray(samples[..., [0, 0, 0]] if samples.shape[-1] == 1 else samples))
        if target is not None and pil.size != target[::-1]:
            pil = pil.resize(target[::-1], resample)
        return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    unit = samples.astype(np.float32) / full_scale
    if unit.shape[-1] in (2, 4):  # straight alpha over a white background
        unit, alpha = unit[..., :-1], unit[..., -1:]
        unit = unit * alpha + (1.0 - alpha)
    if unit.shape[-1] == 1:
        unit = unit[..., [0, 0, 0]]
    if target is not None and unit.shape[:2] != target:
        channels = [Image.fromarray(np.ascontiguousarray(unit[..., c])) for c in range(3)]  # mode "F"
        unit = np.stack([np.asarray(c.resize(target[::-1], resample)) for c in channels], -1).clip(0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1) * 2.0 - 1.0


def natural_key(name: str) -> list:
    """Sort key that orders "view_2" before "view_10" (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _as_size(resolution: int | Sequence[int] | None) -> tuple[int, int] | None:
    """(H, W) from an int or a pair of positive integers (never a truncated float or a bool)."""
    return check_size("resolution / size", resolution)


class MultiViewFolderDataset(torch.utils.data.Dataset):
    """Scenes stored as folders of ordered views (see the module docstring for the layout).

    Args:
        root: folder holding one sub-folder per scene.
        num_views: views per sample; scenes with more keep their first `num_views`, scenes with fewer are an
            error. `None` uses every view and requires all scenes to have the same number.
        resolution: resize every view to this size (int for square, or (H, W)); `None` keeps the stored size.

    Items are dicts with `pixel_values` (V, 3, H, W) in [-1, 1], `prompt` (str), `scene` (folder name) and, when
    the scene has a `cameras.json`, `intrinsics` (V, 3, 3) and `cam_to_world` (V, 4, 4).
    Sizes, view counts and camera files are checked when the dataset is built, before any training step.
    """

    def __init__(self, root: str | Path, num_views: int | None = None, resolution: int | Sequence[int] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {str(root)!r} does not exist or is not a folder")
        if num_views is not None and (
            isinstance(num_views, bool) or not isinstance(num_views, numbers.Integral) or num_views < 2
        ):
            raise ValueError(f"num_views must be an integer of at least 2, got {num_views!r}")
        self.resolution = _as_size(resolution)

        self.scenes: list[list[Path]] = []
        self.scene_dirs: list[Path] = []
        for scene_dir in sorted((p for p in self.root.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
            views = sorted(
                (p for p in scene_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                key=lambda p: natural_key(p.name),
            )
            if views:
                self.scene_dirs.append(scene_dir)
                self.scenes.append(views)
        if not self.scenes:
            raise ValueError(f"dataset root {str(root)!r} holds no scene folder with images {IMAGE_EXTENSIONS}")

        counts = {len(views) for views in self.scenes}
        if num_views is None:
            if len(counts) > 1:
                raise ValueError(f"scenes have different numbers of views {sorted(counts)}; pass num_views")
            num_views = counts.pop()
            if num_views < 2:
                raise ValueError("every scene has a single view; multi-view training needs at least 2")
        for scene_dir, views in zip(self.scene_dirs, self.scenes):
            if len(views) < num_views:
                raise ValueError(f"scene {scene_dir.name!r} has {len(views)} views, fewer than num_views={num_views}")
        self.num_views = num_views
        self.scenes = [views[:num_views] for views in self.scenes]
        self.image_size = self._check_sizes()  # (H, W) of the returned views
        for scene_dir in self.scene_dirs:
            if (scene_dir / CAMERAS_FILE).exists():
                self._read_cameras(scene_dir)  # validate now rather than mid-training

    def _check_sizes(self) -> tuple[int, int]:
        """All views of a scene (and, without `resolution`, of the dataset) must have one size; reads headers only."""
        dataset_size = None
        self._stored_sizes: list[tuple[int, int]] = []
        for scene_dir, views in zip(self.scene_dirs, self.scenes):
            sizes = {}
            for path in views:
                sizes.setdefault(read_image_size(path), path.name)
            if len(sizes) > 1:
                found = ", ".join(f"{name}: {h}x{w}" for (h, w), name in sizes.items())
                raise ValueError(f"views of scene {scene_dir.name!r} have mismatched sizes (HxW) ({found})")
            (size,) = sizes
            self._stored_sizes.append(size)
            if self.resolution is None and dataset_size is not None and size != dataset_size:
                raise ValueError(
                    f"scene {scene_dir.name!r} has views of {size[0]}x{size[1]} but earlier scenes "
                    f"{dataset_size[0]}x{dataset_size[1]}; pass resolution to resize them"
                )
            dataset_size = dataset_size or size
        return self.resolution or dataset_size

    def _read_cameras(self, scene_dir: Path) -> dict[str, torch.Tensor]:
        path = scene_dir / CAMERAS_FILE
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: must hold a JSON object with 'intrinsics' and/or 'cam_to_world'")
        cameras = {}
        for key, shape in (("intrinsics", (3, 3)), ("cam_to_world", (4, 4))):
            if key not in data:
                continue
            try:
                values = torch.tensor(data[key], dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"{path}: {key!r} must be nested lists of numbers") from None
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"{path}: {key!r} holds non-finite values")
            if values.ndim != 3 or tuple(values.shape[1:]) != shape or values.shape[0] < self.num_views:
                raise ValueError(
                    f"{scene_dir.name}/{CAMERAS_FILE}: {key!r} must hold one {shape[0]}x{shape[1]} matrix per view "
                    f"(at least {self.num_views}), got shape {tuple(values.shape)}"
                )
            cameras[key] = values[: self.num_views]
        return cameras

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene_dir, views = self.scene_dirs[index], self.scenes[index]
        stored_size = self._stored_sizes[index]
        pixel_values = torch.stack([load_image(path, self.resolution, Image.BICUBIC) for path in views])
        prompt_path = scene_dir / PROMPT_FILE
        item = {
            "pixel_values": pixel_values,
            "prompt": prompt_path.read_text().strip() if prompt_path.exists() else "",
            "scene": scene_dir.name,
        }
        if (scene_dir / CAMERAS_FILE).exists():
            cameras = self._read_cameras(scene_dir)
            if "intrinsics" in cameras and self.resolution is not None:
                scale = torch.tensor([self.resolution[1] / stored_size[1], self.resolution[0] / stored_size[0], 1.0])
                cameras["intrinsics"] = cameras["intrinsics"] * scale[:, None]
            item.update(cameras)
        return item


def collate_multiview(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: tensors are stacked (camera keys only when every item has them), strings listed."""
    batch: dict[str, Any] = {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "prompt": [item["prompt"] for item in items],
        "scene": [item["scene"] for item in items],
    }
    for key in ("intrinsics", "cam_to_world"):
        if all(key in item for item in items):
            batch[key] = torch.stack([item[key] for item in items])
    return batch


# ----------------------------------------------------------------------------- procedural toy scenes

_COLOUR_NAMES = {
    "red": (0.85, 0.2, 0.15),
    "green": (0.2, 0.7, 0.25),
    "blue": (0.2, 0.35, 0.85),
    "yellow": (0.9, 0.8, 0.2),
    "purple": (0.6, 0.25, 0.7),
    "orange": (0.95, 0.55, 0.15),
}


def random_toy_scene(generator: torch.Generator) -> dict[str, Any]:
    """Random scene description: a checkered floor, 1-2 striped spheres and 1-2 boxes inside a 2x2 area."""

    def uniform(low, high, n=1):
        return low + (high - low) * torch.rand(n, generator=generator)

    names = list(_COLOUR_NAMES)

    def colour():
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        return name, torch.tensor(_COLOUR_NAMES[name])

    spheres, boxes = [], []
    for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
        radius = float(uniform(0.25, 0.45))
        name, rgb = colour()
        centre = torch.cat([uniform(-0.8, 0.8), torch.tensor([radius]), uniform(-0.8, 0.8)])
        spheres.append({"centre": centre, "radius": radius, "colour": rgb, "name": name})
    for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
        half = uniform(0.15, 0.35, 3)
        name, rgb = colour()
        centre = torch.cat([uniform(-0.8, 0.8), half[1:2], uniform(-0.8, 0.8)])
        boxes.append({"low": centre - half, "high": centre + half, "colour": rgb, "name": name})
    floor = (torch.rand(3, generator=generator) * 0.3 + 0.6, torch.rand(3, generator=generator) * 0.3 + 0.15)
    objects = [(s["name"], "sphere") for s in spheres] + [(b["name"], "box") for b in boxes]
    article = {True: "an", False: "a"}
    prompt = " and ".join(f"{article[c[0] in 'aeiou']} {c} {kind}" for c, kind in objects) + " on a checkered floor"
    return {"spheres": spheres, "boxes": boxes, "floor": floor, "prompt": prompt}


def _look_at(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Camera-to-world (4, 4), OpenCV axes (+x right, +y down, +z forward), world +y up."""
    forward = F.normalize(target - eye, dim=0)
    right = F.normalize(torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0])), dim=0)
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def toy_cameras(
    num_views: int, size: tuple[int, int], azimuth_step: float = 20.0, elevation: float = 30.0, distance: float = 3.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras on an arc around the origin, `azimuth_step` degrees apart: intrinsics (V,3,3), cam_to_world (V,4,4)."""
    height, width = size
    focal = 1.2 * max(height, width)  # ~45 degree field of view
    intrinsics = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    start = -azimuth_step * (num_views - 1) / 2
    poses = []
    for v in range(num_views):
        azimuth, elev = math.radians(start + v * azimuth_step), math.radians(elevation)
        eye = distance * torch.tensor(
            [math.sin(azimuth) * math.cos(elev), math.sin(elev), math.cos(azimuth) * math.cos(elev)]
        )
        poses.append(_look_at(eye, torch.tensor([0.0, 0.3, 0.0])))
    return intrinsics.expand(num_views, 3, 3).clone(), torch.stack(poses)


def render_toy_scene(
    scene: dict[str, Any], intrinsics: torch.Tensor, cam_to_world: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray-cast a scene from V cameras: images (V, 3, H, W) in [0, 1] and depth (V, H, W) (inf on the sky)."""
    height, width = size
    v, u = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    pixels = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)  # (P, 3)
    rays_cam = pixels @ torch.linalg.inv(intrinsics).transpose(-1, -2)  # (V, P, 3), z = 1
    directions = F.normalize(rays_cam @ cam_to_world[:, :3, :3].transpose(-1, -2), dim=-1)
    origins = cam_to_world[:, None, :3, 3].expand_as(directions)

    num_rays = directions.shape[:2]
    depth = torch.full(num_rays, math.inf)
    normal = torch.zeros(*num_rays, 3)
    albedo = torch.zeros(*num_rays, 3)

    def keep(t, n, colour):
        hit = (t > 1e-4) & (t < depth)
        depth[hit] = t[hit]
        normal[hit] = n[hit]
        albedo[hit] = colour[hit]

    # floor y = 0 inside |x|, |z| < 2, checkered in 0.5-unit squares
    never = torch.full_like(depth, math.inf)
    t = torch.where(directions[..., 1] < -1e-6, -origins[..., 1] / directions[..., 1], never)
    point = origins + t[..., None] * directions
    t = torch.where(point[..., [0, 2]].abs().amax(-1) < 2.0, t, torch.full_like(t, math.inf))
    checker = ((point[..., 0] / 0.5).floor() + (point[..., 2] / 0.5).floor()).remainder(2)[..., None]
    light, dark = scene["floor"]
    keep(t, torch.tensor([0.0, 1.0, 0.0]).expand_as(point), checker * light + (1 - checker) * dark)

    for sphere in scene["spheres"]:  # |o + t d - c|^2 = r^2, nearest root; latitude stripes
        offset = origins - sphere["centre"]
        b = (offset * directions).sum(-1)
        disc = b**2 - (offset**2).sum(-1) + sphere["radius"] ** 2
        t = torch.where(disc > 0, -b - disc.clamp_min(0).sqrt(), torch.full_like(b, math.inf))
        n = F.normalize(offset + t[..., None] * directions, dim=-1)
        stripes = 0.65 + 0.35 * (torch.sin(n[..., 1] * 9.0) > 0).float()[..., None]
        keep(t, n, sphere["colour"] * stripes)

    for box in scene["boxes"]:  # slab test; faces darken towards their edges
        inv = 1.0 / torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
        t0, t1 = (box["low"] - origins) * inv, (box["high"] - origins) * inv
        t_near, t_far = torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)
        t = torch.where(t_near < t_far, t_near, torch.full_like(t_near, math.inf))
        axis = torch.minimum(t0, t1).argmax(-1)
        n = -F.one_hot(axis, 3).float() * torch.sign(directions)
        centre, half = (box["low"] + box["high"]) / 2, (box["high"] - box["low"]) / 2
        local = (origins + t[..., None] * directions - centre) / half
        edge = local.abs().masked_fill(F.one_hot(axis, 3).bool(), 0).amax(-1, keepdim=True).nan_to_num(0)
        keep(t, n, box["colour"] * (1.0 - 0.4 * edge.clamp(0, 1) ** 4))

    light_dir = F.normalize(torch.tensor([0.4, 1.0, 0.3]), dim=0)
    shade = 0.35 + 0.65 * (normal @ light_dir).clamp_min(0)[..., None]
    sky = torch.tensor([0.55, 0.7, 0.9]) * (0.8 + 0.2 * directions[..., 1:2].clamp(0, 1))
    hit = torch.isfinite(depth)[..., None]
    image = torch.where(hit, albedo * shade, sky).clamp(0, 1)
    z_cam = (depth[..., None] * directions * cam_to_world[:, None, :3, 2]).sum(-1)  # depth along the optical axis
    return image.reshape(-1, height, width, 3).permute(0, 3, 1, 2), z_cam.reshape(-1, height, width)


def make_toy_multiview_dataset(
    root: str | Path,
    num_scenes: int = 8,
    num_views: int = 4,
    resolution: int | Sequence[int] = 32,
    azimuth_step: float = 20.0,
    seed: int = 0,
) -> Path:
    """Write `num_scenes` procedural scenes to `root` in the folder format `MultiViewFolderDataset` reads.

    Each scene gets `num_views` PNG views from cameras `azimuth_step` degrees apart on an arc, a `prompt.txt`
    describing its objects and a `cameras.json`. Deterministic for a given `seed`. Returns `root`.
    """
    if num_scenes < 1 or num_views < 2:
        raise ValueError(f"need num_scenes >= 1 and num_views >= 2, got {num_scenes} and {num_views}")
    size = _as_size(resolution)
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    intrinsics, cam_to_world = toy_cameras(num_views, size, azimuth_step)
    for index in range(num_scenes):
        scene = random_toy_scene(generator)
        images, _ = render_toy_scene(scene, intrinsics, cam_to_world, size)
        scene_dir = root / f"scene_{index:04d}"
        scene_dir.mkdir(parents=True, exist_ok=True)
        for v, image in enumerate(images):
            pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(scene_dir / f"view_{v:02d}.png")
        (scene_dir / PROMPT_FILE).write_text(scene["prompt"] + "\n")
        cameras = {"intrinsics": intrinsics.tolist(), "cam_to_world": cam_to_world.tolist()}
        (scene_dir / CAMERAS_FILE).write_text(json.dumps(cameras))
    return root
