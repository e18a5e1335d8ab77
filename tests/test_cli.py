"""`met3r-diffusers score` end to end on temp folders, with tiny local checkpoints (no download)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from met3r_diffusers.testing import TINY_MAST3R
from PIL import Image
from safetensors.torch import save_file

from met3r_diffusers import cli
from met3r_diffusers.models import DinoFeatUp, MASt3R


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """A tiny MASt3R in save_pretrained layout and a DINO + ChannelNorm checkpoint (bilinear upsampler)."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    MASt3R(**TINY_MAST3R).save_pretrained(root / "mast3r")
    features = DinoFeatUp(upsampler="bilinear")
    save_file(features.state_dict(), str(root / "featup.safetensors"))
    return {"MET3R_BACKBONE_WEIGHTS": str(root / "mast3r"), "MET3R_FEATUP_WEIGHTS": str(root / "featup.safetensors")}


def _write_scene(folder: Path, num_views: int, size: tuple[int, int] = (72, 64), seed: int = 0) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1], size[0] + 8 * num_views, 3), dtype=np.uint8)
    for v in range(num_views):  # views slide across one random texture
        Image.fromarray(base[:, 8 * v : 8 * v + size[0]]).save(folder / f"view_{v}.png")
    (folder / "notes.txt").write_text("not an image")


def _args(weights: dict[str, str], *extra: str) -> list[str]:
    return ["score", *extra, "--size", "64", "--upsampler", "bilinear", "--quiet",
            "--backbone-weights", weights["MET3R_BACKBONE_WEIGHTS"], "--featup-weights", weights["MET3R_FEATUP_WEIGHTS"]]


def test_find_scenes_folders_nested_and_globs(tmp_path):
    for name, views in (("a", 3), ("b", 2), ("c", 11)):
        _write_scene(tmp_path / "root" / name, views)
    scenes = cli.find_scenes([str(tmp_path / "root")])
    assert [Path(n).name for n, _ in scenes] == ["a", "b", "c"]
    assert [f.name for f in scenes[2][1]][:3] == ["view_0.png", "view_1.png", "view_2.png"]  # natural order
    assert [f.name for f in scenes[2][1]][-1] == "view_10.png"
    (glob_scene,) = cli.find_scenes([str(tmp_path / "root" / "a" / "view_*.png")])
    assert len(glob_scene[1]) == 3
    assert len(cli.find_scenes([str(tmp_path / "root" / "*")])) == 3
    with pytest.raises(ValueError, match="no such folder"):
        cli.find_scenes([str(tmp_path / "missing")])
    # a glob skips folders without images; a folder named explicitly must have some
    (tmp_path / "root" / "logs").mkdir()
    assert len(cli.find_scenes([str(tmp_path / "root" / "*")])) == 3
    with pytest.raises(ValueError, match="no images"):
        cli.find_scenes([str(tmp_path / "root" / "logs")])
    # the same scene twice is scored once; an existing path with glob characters is taken literally
    assert len(cli.find_scenes([str(tmp_path / "root" / "a"), str(tmp_path / "root" / "a")])) == 1
    _write_scene(tmp_path / "odd[1]", 2)
    assert len(cli.find_scenes([str(tmp_path / "odd[1]")])) == 1
    (tmp_path / "single").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "single" / "only.png")
    with pytest.raises(ValueError, match="at least 2 views"):
        cli.find_scenes([str(tmp_path / "single")])


def test_load_views_resizes_short_side_and_crops_to_16(tmp_path):
    _write_scene(tmp_path / "s", 2, size=(100, 70))
    views = cli.load_views(sorted((tmp_path / "s").glob("*.png")), size=64)
    assert views.shape == (2, 3, 64, 80) and views.min() >= -1 and views.max() <= 1
    assert cli.load_views(sorted((tmp_path / "s").glob("*.png")), size=None).shape == (2, 3, 64, 96)


def test_score_json_report_and_heatmaps(tmp_path, weights, capsys):
    _write_scene(tmp_path / "scenes" / "first", 3, seed=1)
    _write_scene(tmp_path / "scenes" / "second", 3, seed=2)
    out, maps = tmp_path / "report.json", tmp_path / "maps"
    code = cli.main(_args(weights, str(tmp_path / "scenes"), "--pairs", "all", "--batch-size", "2",
                          "--out", str(out), "--heatmaps", str(maps)))
    assert code == 0
    report = json.loads(out.read_text())
    assert report["complete"] and report["num_scenes"] == 2 and report["settings"]["pairs"] == "all"
    first = report["scenes"][0]
    assert Path(first["scene"]).name == "first" and len(first["views"]) == 3
    assert [(p["i"], p["j"]) for p in first["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    assert first["pairs"][0]["view_i"] == "view_0.png" and 0 <= first["pairs"][0]["overlap"] <= 1
    # the random tiny network's geometry may not overlap: such pairs are null, never a fake 0
    for scene in report["scenes"]:
        for pair in scene["pairs"]:
            assert (pair["score"] is None) == (pair["overlap"] == 0)
    pngs = sorted(p.name for p in maps.glob("*.png"))
    assert len(pngs) == 6 and "0000_first_view_0_view_2.png" in pngs and "0001_second_view_1_view_2.png" in pngs
    with Image.open(maps / "0000_first_view_0_view_2.png") as picture:
        assert picture.size == (64, 64) and picture.mode == "RGB"
    assert "2 scenes" in capsys.readouterr().out


def test_score_csv_report_matches_the_metric(tmp_path, weights):
    _write_scene(tmp_path / "scene", 4)
    out = tmp_path / "report.csv"
    assert cli.main(_args(weights, str(tmp_path / "scene"), "--out", str(out))) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["i"], r["j"]) for r in rows] == [("0", "1"), ("1", "2"), ("2", "3")]
    from met3r_diffusers import MEt3R

    metric = MEt3R(img_size=None, backbone=MASt3R.from_pretrained(weights["MET3R_BACKBONE_WEIGHTS"]),
                   feature_backbone=DinoFeatUp.from_pretrained(weights["MET3R_FEATUP_WEIGHTS"], upsampler="bilinear"))
    views = cli.load_views(sorted((tmp_path / "scene").glob("*.png")), 64)
    expected = metric(views[None]).overlap_fraction[0]
    assert [float(r["overlap"]) for r in rows] == pytest.approx(expected.tolist())
    bf16 = tmp_path / "bf16.csv"
    assert cli.main(_args(weights, str(tmp_path / "scene"), "--out", str(bf16), "--bf16")) == 0
    assert len(list(csv.DictReader(bf16.open()))) == 3


def test_interrupt_keeps_the_scenes_scored_so_far(tmp_path, weights, monkeypatch):
    for k in range(3):
        _write_scene(tmp_path / "scenes" / f"s{k}", 2, seed=k)
    original = cli.Report.add
    calls = []

    def add_then_interrupt(self, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cli.Report, "add", add_then_interrupt)
    out = tmp_path / "report.json"
    assert cli.main(_args(weights, str(tmp_path / "scenes"), "--out", str(out))) == 130
    report = json.loads(out.read_text())
    assert not report["complete"] and [Path(s["scene"]).name for s in report["scenes"]] == ["s0", "s1"]
    assert not list(tmp_path.glob("*.partial"))


def test_unreadable_scene_is_reported_and_skipped(tmp_path, weights):
    _write_scene(tmp_path / "scenes" / "a_good", 2)
    _write_scene(tmp_path / "scenes" / "b_broken", 2)
    (tmp_path / "scenes" / "b_broken" / "view_1.png").write_bytes(b"not a png")
    _write_scene(tmp_path / "scenes" / "c_mixed", 2)
    Image.new("RGB", (96, 64)).save(tmp_path / "scenes" / "c_mixed" / "view_1.png")
    out = tmp_path / "report.json"
    # every scene is attempted (complete); exit status 3 says some failed (it was 0 before per-scene failures counted)
    assert cli.main(_args(weights, str(tmp_path / "scenes"), "--out", str(out), "--size", "0")) == cli.EXIT_FAILED_SCENES
    report = json.loads(out.read_text())
    assert report["complete"] and report["num_errors"] == 2 and report["num_scenes"] == 3
    errors = {Path(s["scene"]).name: s.get("error") for s in report["scenes"]}
    assert errors["a_good"] is None and "UnidentifiedImageError" in errors["b_broken"]
    assert "share a size" in errors["c_mixed"]


def test_bad_arguments_exit_with_a_message(tmp_path, weights):
    with pytest.raises(SystemExit, match="no such folder"):
        cli.main(_args(weights, str(tmp_path / "nothing")))
    _write_scene(tmp_path / "scene", 2)
    with pytest.raises(SystemExit, match=".json or .csv"):
        cli.main(_args(weights, str(tmp_path / "scene"), "--out", str(tmp_path / "report.txt")))
    with pytest.raises(SystemExit, match="--batch-size"):
        cli.main(_args(weights, str(tmp_path / "scene"), "--batch-size", "0"))


def test_offline_without_weights_explains_how_to_provide_them(tmp_path):
    _write_scene(tmp_path / "scene", 2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th")}
    env.pop("MET3R_BACKBONE_WEIGHTS", None)
    result = subprocess.run([sys.executable, "-m", "met3r_diffusers.cli", "score", str(tmp_path / "scene")],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 1
    assert "could not load the MEt3R weights" in result.stderr and "--backbone-weights" in result.stderr
    assert "naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric" in result.stderr


def test_compile_flag_reaches_the_metric(weights, monkeypatch):
    import met3r_diffusers.metric as metric_module

    seen = {}
    original = metric_module.MEt3R

    class Recording(original):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(metric_module, "MEt3R", Recording)
    for flag, expected in ((["--compile"], True), ([], False)):
        args = cli.build_parser().parse_args(_args(weights, *flag, "unused"))
        metric = cli.build_metric(args)
        assert seen["compile"] is expected and metric.config.compile is expected


def test_out_in_a_missing_folder_is_created_and_bad_resume_files_exit_2(tmp_path):
    _write_scene(tmp_path / "scenes" / "a", 2, size=(64, 64))
    factory = ["--metric-factory", "met3r_diffusers.testing:FeatureConsistencyMetric", "--size", "64", "--quiet"]
    out = tmp_path / "new" / "deeper" / "r.json"
    assert cli.main(["score", str(tmp_path / "scenes"), "--out", str(out), *factory]) == 0
    assert json.loads(out.read_text())["num_scenes"] == 1
    for content in ("[1, 2]", '{"settings": 5}', '{"scenes": 3}'):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(SystemExit) as exit_info:  # UsageError: one line, exit status 2
            cli.main(["score", str(tmp_path / "scenes"), "--out", str(bad), "--resume", *factory])
        assert exit_info.value.code == 2 and "not a report" in str(exit_info.value)
    journal = tmp_path / "j.json.journal.0"
    journal.write_text('{"settings": [1]}\n')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["score", str(tmp_path / "scenes"), "--out", str(tmp_path / "j.json"), "--resume", *factory])
    assert exit_info.value.code == 2 and "not a" in str(exit_info.value)
