"""Multi-view folder dataset, image decoding and procedural toy scenes: format, ordering, cameras, bit depths,
colour modes, EXIF orientation, geometric consistency, errors."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from met3r_diffusers import cli
from met3r_diffusers.data import (
    MultiViewFolderDataset,
    collate_multiview,
    load_image,
    make_toy_multiview_dataset,
    random_toy_scene,
    read_image_size,
    render_toy_scene,
    toy_cameras,
)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return make_toy_multiview_dataset(tmp_path_factory.mktemp("toy"), num_scenes=3, num_views=4, resolution=(24, 32))


def test_toy_dataset_round_trip(toy_root):
    dataset = MultiViewFolderDataset(toy_root)
    assert len(dataset) == 3 and dataset.num_views == 4 and dataset.image_size == (24, 32)
    item = dataset[1]
    assert item["pixel_values"].shape == (4, 3, 24, 32) and item["scene"] == "scene_0001"
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    assert item["prompt"].endswith("on a checkered floor") and ("sphere" in item["prompt"])
    intrinsics, cam_to_world = toy_cameras(4, (24, 32))
    torch.testing.assert_close(item["intrinsics"], intrinsics)
    torch.testing.assert_close(item["cam_to_world"], cam_to_world)
    batch = collate_multiview([dataset[0], dataset[2]])
    assert batch["pixel_values"].shape == (2, 4, 3, 24, 32) and batch["cam_to_world"].shape == (2, 4, 4, 4)
    assert batch["scene"] == ["scene_0000", "scene_0002"]


def test_toy_dataset_is_deterministic(tmp_path, toy_root):
    again = make_toy_multiview_dataset(tmp_path, num_scenes=3, num_views=4, resolution=(24, 32))
    for name in ("scene_0002/view_03.png", "scene_0000/prompt.txt", "scene_0001/cameras.json"):
        assert (again / name).read_bytes() == (toy_root / name).read_bytes()
    other = make_toy_multiview_dataset(tmp_path / "other", num_scenes=1, num_views=4, resolution=(24, 32), seed=1)
    assert (other / "scene_0000/view_00.png").read_bytes() != (toy_root / "scene_0000/view_00.png").read_bytes()


def test_toy_views_are_geometrically_consistent():
    """Reprojecting view 0's pixels with its depth and the stored cameras lands on the same colours in view 1."""
    size = (96, 128)
    intrinsics, cam_to_world = toy_cameras(2, size, azimuth_step=10.0)
    images, depth = render_toy_scene(random_toy_scene(torch.Generator().manual_seed(3)), intrinsics, cam_to_world, size)
    v, u = torch.meshgrid(torch.arange(size[0]) + 0.5, torch.arange(size[1]) + 0.5, indexing="ij")
    rays = torch.stack([u, v, torch.ones_like(u)], -1) @ torch.linalg.inv(intrinsics[0]).T
    points_cam0 = rays * depth[0][..., None]  # (H, W, 3), z = depth
    world = points_cam0 @ cam_to_world[0, :3, :3].T + cam_to_world[0, :3, 3]
    world_to_cam1 = torch.linalg.inv(cam_to_world[1])
    points_cam1 = world @ world_to_cam1[:3, :3].T + world_to_cam1[:3, 3]
    pixels1 = points_cam1 @ intrinsics[1].T
    pixels1 = pixels1[..., :2] / pixels1[..., 2:]
    grid = torch.stack([pixels1[..., 0] / size[1] * 2 - 1, pixels1[..., 1] / size[0] * 2 - 1], -1)
    warped = F.grid_sample(images[1:2], grid[None], mode="nearest", align_corners=False)[0]
    valid = torch.isfinite(depth[0]) & (grid.abs() < 0.95).all(-1)
    assert valid.float().mean() > 0.5
    error = (warped - images[0]).abs().amax(0)[valid]
    assert (error < 0.05).float().mean() > 0.9  # all but occlusion boundaries / checker edges agree
    # an unrelated pairing does not
    assert ((images[0].flip(-1) - images[0]).abs().amax(0)[valid] < 0.05).float().mean() < 0.8


def _views(scene_dir, sizes, names=None):
    scene_dir.mkdir(parents=True)
    names = names or [f"view_{v}.png" for v in range(len(sizes))]
    for v, (size, name) in enumerate(zip(sizes, names)):
        Image.new("RGB", size, (20 * v, 0, 0)).save(scene_dir / name)


def test_views_are_ordered_numerically_and_resized(tmp_path):
    _views(tmp_path / "s", [(8, 6)] * 3, names=["view_10.png", "view_2.png", "view_1.jpg"])
    intrinsics = [[[8.0, 0, 4], [0, 8.0, 3], [0, 0, 1]]] * 3
    (tmp_path / "s" / "cameras.json").write_text(json.dumps({"intrinsics": intrinsics}))
    dataset = MultiViewFolderDataset(tmp_path, resolution=(12, 16))
    assert [p.name for p in dataset.scenes[0]] == ["view_1.jpg", "view_2.png", "view_10.png"]
    item = dataset[0]
    assert item["pixel_values"].shape == (3, 3, 12, 16) and item["prompt"] == ""
    reds = ((item["pixel_values"][:, 0, 0, 0] + 1) * 127.5).round()
    assert reds.tolist() == [40.0, 20.0, 0.0]  # view_1 was written third (red 40), view_2 second, view_10 first
    torch.testing.assert_close(item["intrinsics"][0], torch.tensor([[16.0, 0, 8], [0, 16.0, 6], [0, 0, 1]]))
    assert "cam_to_world" not in item
    assert MultiViewFolderDataset(tmp_path, num_views=2)[0]["pixel_values"].shape[0] == 2


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MultiViewFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no scene folder"):
        MultiViewFolderDataset(tmp_path)
    _views(tmp_path / "a" / "s0", [(8, 8), (8, 8)])
    _views(tmp_path / "a" / "s1", [(8, 8), (8, 16)])
    with pytest.raises(ValueError, match="'s1' have mismatched sizes"):
        MultiViewFolderDataset(tmp_path / "a")
    _views(tmp_path / "b" / "s0", [(8, 8), (8, 8)])
    _views(tmp_path / "b" / "s1", [(16, 16), (16, 16), (16, 16)])
    with pytest.raises(ValueError, match="different numbers of views"):
        MultiViewFolderDataset(tmp_path / "b")
    with pytest.raises(ValueError, match="has 2 views, fewer than num_views=3"):
        MultiViewFolderDataset(tmp_path / "b", num_views=3)
    with pytest.raises(ValueError, match="pass resolution"):
        MultiViewFolderDataset(tmp_path / "b", num_views=2)
    assert MultiViewFolderDataset(tmp_path / "b", num_views=2, resolution=8).image_size == (8, 8)
    (tmp_path / "b" / "s0" / "cameras.json").write_text(json.dumps({"cam_to_world": [[[1, 0, 0], [0, 1, 0]]]}))
    with pytest.raises(ValueError, match="cam_to_world"):
        MultiViewFolderDataset(tmp_path / "b", num_views=2, resolution=8)
    with pytest.raises(ValueError, match="num_views"):
        MultiViewFolderDataset(tmp_path / "a", num_views=1)
    with pytest.raises(ValueError, match="resolution"):
        MultiViewFolderDataset(tmp_path / "a", resolution=(8, 0))
    with pytest.raises(ValueError, match="num_views"):
        make_toy_multiview_dataset(tmp_path / "c", num_views=1)


# ----------------------------------------------------------------------------- image decoding


def _unit(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) float64 in [0, 1]."""
    return ((image.double() + 1) / 2).permute(1, 2, 0).numpy()


def _write_png16(path, samples: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write RGB48 / RGBA64 / LA16); rows cycle through all 5 filters."""
    height, width, channels = samples.shape
    rows = samples.astype(">u2").reshape(height, width * channels).view(np.uint8).astype(np.int32)
    bpp = 2 * channels
    lines = []
    for i, row in enumerate(rows):
        prior = rows[i - 1] if i else np.zeros_like(row)
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
        p = left + prior - upper_left
        pa, pb, pc = np.abs(p - left), np.abs(p - prior), np.abs(p - upper_left)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upper_left))
        kind = i % 5
        predictor = [0, left, prior, (left + prior) // 2, paeth][kind]
        lines.append(bytes([kind]) + ((row - predictor) % 256).astype(np.uint8).tobytes())

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(lines)))
        + chunk(b"IEND", b"")
    )


def test_16_bit_greyscale_png_is_read_at_full_precision(tmp_path):
    """A full-range I;16 gradient: convert("RGB") read 99.6 % of it as +1; every level must survive."""
    gradient = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(gradient).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode == "I;16"
    image = load_image(tmp_path / "grey16.png")
    assert image.shape == (3, 256, 256) and image.dtype == torch.float32
    assert (image == 1).float().mean() < 1e-4  # the single 65535 pixel
    levels = _unit(image) * 65535
    assert np.abs(levels - gradient[..., None]).max() < 0.02
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4), (4, 2)])  # RGB48, RGBA64, LA16
def test_16_bit_colour_pngs_are_read_at_full_precision(tmp_path, color_type, channels):
    rng = np.random.default_rng(color_type)
    samples = rng.integers(0, 65536, (13, 17, channels), dtype=np.uint16)
    _write_png16(tmp_path / "wide.png", samples, color_type)
    unit = samples / 65535
    if channels in (2, 4):  # alpha over white
        unit = unit[..., :-1] * unit[..., -1:] + (1 - unit[..., -1:])
    expected = np.broadcast_to(unit, (13, 17, 3))
    got = _unit(load_image(tmp_path / "wide.png"))
    assert np.abs(got - expected).max() < 1e-6  # 8-bit decoding would be off by up to 255 / 65535
    assert read_image_size(tmp_path / "wide.png") == (13, 17)


def test_16_bit_images_are_resized_in_full_precision(tmp_path):
    ramp = (np.linspace(0, 1, 40)[None, :] * np.linspace(0.2, 0.3, 30)[:, None] * 65535).round().astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    image = load_image(tmp_path / "ramp.png", (15, 20))
    assert image.shape == (3, 15, 20)
    assert len(torch.unique(image[0])) > 200  # 0..0.3 in 8 bits would leave at most 77 levels
    assert -1 <= image.min() and image.max() <= 1


def test_alpha_palette_la_and_colour_keys_are_composited_over_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 255], [0, 255, 0, 0], [0, 0, 255, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    a = 128 / 255
    np.testing.assert_allclose(
        _unit(load_image(tmp_path / "rgba.png"))[0], [[1, 0, 0], [1, 1, 1], [1 - a, 1 - a, 1]], atol=1e-6
    )

    Image.fromarray(np.array([[[50, 255], [50, 0], [200, 51]]], dtype=np.uint8), "LA").save(tmp_path / "la.png")
    grey = [50 / 255, 1.0, 200 / 255 * 0.2 + 0.8]
    expected = np.repeat(np.array(grey)[:, None], 3, 1)
    np.testing.assert_allclose(_unit(load_image(tmp_path / "la.png"))[0], expected, atol=1e-6)

    palette = Image.new("P", (3, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 0] + [0] * 759)
    palette.putdata([0, 1, 2])
    palette.save(tmp_path / "palette.png", transparency=2)
    with Image.open(tmp_path / "palette.png") as image:
        assert image.mode == "P"
    np.testing.assert_allclose(
        _unit(load_image(tmp_path / "palette.png"))[0] * 255, [[10, 20, 30], [200, 100, 0], [255, 255, 255]], atol=1e-4
    )
    palette.save(tmp_path / "opaque_palette.png")
    np.testing.assert_allclose(
        _unit(load_image(tmp_path / "opaque_palette.png"))[0] * 255, [[10, 20, 30], [200, 100, 0], [0, 0, 0]], atol=1e-4
    )

    keyed = Image.fromarray(np.array([[[9, 9, 9], [7, 8, 9]]], dtype=np.uint8))
    keyed.save(tmp_path / "key.png", transparency=(9, 9, 9))
    got = _unit(load_image(tmp_path / "key.png"))[0] * 255
    np.testing.assert_allclose(got, [[255, 255, 255], [7, 8, 9]], atol=1e-4)


def test_cmyk_jpeg_is_converted_exactly(tmp_path):
    rng = np.random.default_rng(1)
    cmyk = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    with Image.open(tmp_path / "cmyk.jpg") as image:
        assert image.mode == "CMYK"
        decoded = np.asarray(image).astype(np.float64) / 255
    expected = (1 - decoded[..., :3]) * (1 - decoded[..., 3:])
    assert np.abs(_unit(load_image(tmp_path / "cmyk.jpg")) - expected).max() < 1e-6


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "view.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "view.jpg") as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    got = load_image(tmp_path / "view.jpg")
    assert got.shape[1:] == expected.shape[:2] == ((9, 6) if orientation >= 5 else (6, 9))
    assert read_image_size(tmp_path / "view.jpg") == expected.shape[:2]
    assert np.array_equal((_unit(got) * 255).round(), expected)


def test_plain_8_bit_images_decode_and_resize_exactly_as_before(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    Image.fromarray(pixels[..., 0]).save(tmp_path / "grey.png")
    for name in ("rgb.png", "grey.png"):
        with Image.open(tmp_path / name) as image:
            rgb = image.convert("RGB")
            old = torch.from_numpy(np.asarray(rgb.resize((16, 12), Image.BICUBIC)).copy()).permute(2, 0, 1)
            old_full = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        assert torch.equal(load_image(tmp_path / name, (12, 16)), old.float() / 127.5 - 1.0)
        assert torch.equal(load_image(tmp_path / name), old_full.float() / 127.5 - 1.0)


def test_dataset_and_cli_share_the_loader(tmp_path):
    scene = tmp_path / "root" / "scene"
    scene.mkdir(parents=True)
    gradient = (np.arange(32 * 48, dtype=np.uint32).reshape(32, 48) * 40).astype(np.uint16)
    Image.fromarray(gradient).save(scene / "view_0.png")
    image = Image.fromarray(np.full((48, 32, 3), 100, dtype=np.uint8))  # stored 32 wide, shown 48 wide
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(scene / "view_1.jpg", exif=exif.tobytes(), quality=95)

    item = MultiViewFolderDataset(tmp_path / "root")[0]
    views = cli.load_views(cli.find_scenes([str(scene)])[0][1], size=None)
    assert item["pixel_values"].shape == views.shape == (2, 3, 32, 48)
    assert torch.equal(item["pixel_values"], views)
    levels = _unit(views[0]) * 65535
    assert np.abs(levels[..., 0] - gradient).max() < 0.02


def test_decompression_bombs_raise_value_error_naming_the_file(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "warns.png")  # 1600 px: over the limit, Pillow only warns
    Image.new("RGB", (50, 50)).save(tmp_path / "errors.png")  # 2500 px: over twice the limit, Pillow raises
    scene = tmp_path / "root" / "scene"
    scene.mkdir(parents=True)
    for v in range(2):
        Image.new("RGB", (50, 50)).save(scene / f"view_{v}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("warns.png", "errors.png"):
        for read in (load_image, read_image_size):
            with pytest.raises(ValueError, match=f"{name}: refusing .*decompression bomb") as error:
                read(tmp_path / name)
            assert not isinstance(error.value, Image.DecompressionBombError)
    with pytest.raises(ValueError, match="view_0.png: refusing"):
        MultiViewFolderDataset(tmp_path / "root")
    with pytest.raises(ValueError, match="view_0.png: refusing"):
        cli.load_views([scene / "view_0.png", scene / "view_1.png"], size=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(tmp_path / "errors.png").shape == (3, 50, 50)


def test_corrupt_truncated_and_missing_files(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    pixels = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.png")
    Image.fromarray(pixels).save(tmp_path / "full.jpg", quality=90)
    for name in ("png", "jpg"):
        data = (tmp_path / f"full.{name}").read_bytes()
        (tmp_path / f"cut.{name}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="garbage.png: not a readable image.*UnidentifiedImageError"):
        load_image(tmp_path / "garbage.png")
    with pytest.raises(ValueError, match="garbage.png: not a readable image"):
        read_image_size(tmp_path / "garbage.png")
    for name in ("cut.png", "cut.jpg"):
        with pytest.raises(ValueError, match=f"{name}: not a readable image, corrupt or truncated"):
            load_image(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")

    scene = tmp_path / "root" / "scene"
    scene.mkdir(parents=True)
    (scene / "view_0.png").write_bytes((tmp_path / "full.png").read_bytes())
    (scene / "view_1.png").write_bytes((tmp_path / "cut.png").read_bytes())
    dataset = MultiViewFolderDataset(tmp_path / "root")  # the header is intact
    with pytest.raises(ValueError, match="view_1.png: not a readable image"):
        dataset[0]
