"""Multi-view folder dataset and procedural toy scenes: format, ordering, cameras, geometric consistency, errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from met3r_diffusers.data import (
    MultiViewFolderDataset,
    collate_multiview,
    make_toy_multiview_dataset,
    random_toy_scene,
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
