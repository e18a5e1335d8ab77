"""`met3r-diffusers score` at scale: sharding under `accelerate launch`, journals and --resume (SIGKILL too),
low-overlap flags, per-scene isolation, up-front checks, the download subcommand, MEt3RMetric under 2 processes.

The metric comes from `--metric-factory` (env MET3R_DIFFUSERS_METRIC_FACTORY): the factories below wrap the tiny
stand-ins of `met3r_diffusers.testing` and, for subprocesses, are imported from this folder (PYTHONPATH).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from met3r_diffusers import MEt3RMetric, cli
from met3r_diffusers.testing import FeatureConsistencyMetric, tiny_met3r

TESTS = Path(__file__).resolve().parent
CALLS_ENV, DELAY_ENV, RUN_ENV = "MET3R_TEST_CALLS", "MET3R_TEST_DELAY", "MET3R_TEST_RUN"


# ----------------------------------------------------------------------------- factories and scenes


def view_key(views: torch.Tensor) -> str:
    """What identifies one scene's views (V, 3, H, W) in the calls file."""
    return f"{float(views.double().sum()):.6f}"


class CountingMetric(torch.nn.Module):
    """tiny_met3r that appends `<run> <scene key>` per scored scene to $MET3R_TEST_CALLS (after $MET3R_TEST_DELAY s)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_met3r()

    def forward(self, views: torch.Tensor, **kwargs):
        """Log, wait, score."""
        with open(os.environ[CALLS_ENV], "a") as handle:
            handle.write("".join(f"{os.environ.get(RUN_ENV, '-')} {view_key(v)}\n" for v in views))
        time.sleep(float(os.environ.get(DELAY_ENV, "0")))
        return self.inner(views, **kwargs)


def counting_metric() -> CountingMetric:
    """Factory for --metric-factory test_score_scale:counting_metric."""
    return CountingMetric()


def shifted_metric() -> FeatureConsistencyMetric:
    """Overlap 33/64 for adjacent views of 64-pixel-wide scenes, 2/64 for views two apart."""
    return FeatureConsistencyMetric(shift=31)


def _write_scene(folder: Path, num_views: int, seed: int, width: int = 72) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (64, width + 8 * num_views, 3), dtype=np.uint8)
    for v in range(num_views):
        Image.fromarray(base[:, 8 * v : 8 * v + width]).save(folder / f"view_{v}.png")


def _scenes(root: Path, views=(2, 3, 2, 4, 3, 2, 2, 3)) -> Path:
    for k, v in enumerate(views):
        _write_scene(root / f"s{k:02d}", v, seed=k)
    return root


def _score(*args: str, factory: str = "met3r_diffusers.testing:tiny_met3r") -> int:
    return cli.main(["score", *args, "--size", "64", "--quiet", "--metric-factory", factory])


def _scenes_of(path: Path) -> list:
    return json.loads(path.read_text())["scenes"]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch_failure(result: subprocess.CompletedProcess) -> str:
    """The lines of a failed launch that say why (the launcher's own summary comes last and hides them)."""
    lines = result.stderr.splitlines()
    return "\n".join([line for line in lines if "rror" in line or "terminate" in line or "what()" in line][:30]
                     + lines[-20:])


def _accelerate(num_processes: int, *command: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *command]


def _launch(num_processes: int, *command: str, env: dict) -> subprocess.CompletedProcess:
    """`accelerate launch` the command; one retry (new port) when gloo aborted a rank (seen about 1 run in 13 on a
    loaded 2-core machine: SIGABRT, "terminate called without an active exception"), never for other failures."""
    result = subprocess.run(_accelerate(num_processes, *command), env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and ("SIGABRT" in result.stderr or "terminate called" in result.stderr):
        result = subprocess.run(_accelerate(num_processes, *command), env=env, capture_output=True, text=True,
                                timeout=300)
    return result


# ----------------------------------------------------------------------------- planning and sharding


def test_batches_are_planned_globally_and_shards_balance_views(tmp_path):
    root = _scenes(tmp_path / "scenes")
    _write_scene(root / "s08", 3, seed=8, width=96)  # another shape: a batch of its own
    scenes = cli.find_scenes([str(root)])
    batches = cli.plan_batches(scenes, 64, 2)
    assert batches == [[0], [1], [2], [3], [4], [5, 6], [7], [8]]
    assert cli.plan_batches(scenes, 64, 1) == [[k] for k in range(9)]
    weights = [len(files) for _, files in scenes]
    shards = cli.shard_batches(batches, weights, 2)
    assert sorted(n for shard in shards for n in shard) == list(range(len(batches)))  # each batch once
    loads = [sum(weights[k] for n in shard for k in batches[n]) for shard in shards]
    assert loads == [12, 12] and shards == cli.shard_batches(batches, weights, 2)  # balanced, deterministic
    assert all(shard == sorted(shard) for shard in shards)
    assert cli.shard_batches(batches, weights, 3)[2]  # every process gets work
    with pytest.raises(ValueError, match="num_processes"):
        cli.shard_batches(batches, weights, 0)


def test_workers_and_batches_give_the_same_report(tmp_path):
    root = _scenes(tmp_path / "scenes")
    assert _score(str(root), "--out", str(tmp_path / "plain.json")) == 0
    assert _score(str(root), "--out", str(tmp_path / "workers.json"), "--num-workers", "2", "--batch-size", "2") == 0
    plain, workers = _scenes_of(tmp_path / "plain.json"), _scenes_of(tmp_path / "workers.json")
    assert [s["scene"] for s in plain] == [s["scene"] for s in workers]
    for a, b in zip(plain, workers):
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)


# ----------------------------------------------------------------------------- resume and journals


def test_resume_scores_only_what_is_missing(tmp_path, monkeypatch):
    root, calls = _scenes(tmp_path / "scenes"), tmp_path / "calls.txt"
    monkeypatch.setenv(CALLS_ENV, str(calls))
    reference = tmp_path / "reference.json"
    assert _score(str(root), "--out", str(reference), factory="test_score_scale:counting_metric") == 0
    calls.unlink()
    out = tmp_path / "report.json"
    original = cli.Report.add

    def add_then_interrupt(self, *args, **kwargs):
        if len(self.scenes) == 3:
            raise KeyboardInterrupt
        original(self, *args, **kwargs)

    monkeypatch.setattr(cli.Report, "add", add_then_interrupt)
    assert _score(str(root), "--out", str(out), factory="test_score_scale:counting_metric") == cli.EXIT_INTERRUPTED
    monkeypatch.setattr(cli.Report, "add", original)
    assert len(_scenes_of(out)) == 3 and len(cli.Journal.paths(out)) == 1
    assert len(calls.read_text().splitlines()) == 4  # the 4th scene was in flight
    calls.unlink()
    assert _score(str(root), "--out", str(out), "--resume", factory="test_score_scale:counting_metric") == 0
    assert len(calls.read_text().splitlines()) == 8 - 3  # the recorded scenes are not scored again
    assert _scenes_of(out) == _scenes_of(reference)
    assert json.loads(out.read_text())["complete"] and not cli.Journal.paths(out)  # merged, journal removed
    # a complete report resumed: nothing to score, same report
    calls.unlink()
    assert _score(str(root), "--out", str(out), "--resume", factory="test_score_scale:counting_metric") == 0
    assert not calls.exists() and _scenes_of(out) == _scenes_of(reference)
    # a changed view file is scored again (its fingerprint changed)
    os.utime(root / "s01" / "view_0.png", ns=(1, 1))
    assert _score(str(root), "--out", str(out), "--resume", factory="test_score_scale:counting_metric") == 0
    assert len(calls.read_text().splitlines()) == 1


def test_resume_with_other_settings_is_a_clear_error(tmp_path):
    root = _scenes(tmp_path / "scenes", views=(2, 2))
    out = tmp_path / "report.json"
    assert _score(str(root), "--out", str(out)) == 0
    with pytest.raises(SystemExit, match="other settings.*pairs: 'adjacent' there, 'all' now") as error:
        _score(str(root), "--out", str(out), "--resume", "--pairs", "all")
    assert error.value.code == 2
    with pytest.raises(SystemExit, match="--resume needs --out"):
        _score(str(root), "--resume")


def test_an_interrupted_rerun_keeps_the_complete_report(tmp_path, monkeypatch, capsys):
    root = _scenes(tmp_path / "scenes", views=(2, 2, 2))
    out = tmp_path / "report.json"
    assert _score(str(root), "--out", str(out)) == 0
    before = out.read_text()
    capsys.readouterr()

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Report, "add", interrupt)
    assert _score(str(root), "--out", str(out), "--pairs", "all") == cli.EXIT_INTERRUPTED
    assert out.read_text() == before and not list(tmp_path.glob("*.partial"))
    # the summary line describes this run and says that the report on disk is the earlier one
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("0 scenes") and f"not written; {out} keeps the earlier complete report" in summary


def _recorded(out: Path) -> set[str]:
    """Scene names in the report and journals on disk now (what a kill must not lose)."""
    names = {s["scene"] for s in _scenes_of(out)} if out.is_file() else set()
    for journal in cli.Journal.paths(out):
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "record" in entry:
                names.add(entry["record"]["scene"])
    return names


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_report(tmp_path):
    root, calls = _scenes(tmp_path / "scenes", views=(2, 3, 2, 2, 3, 2, 2, 2, 3, 2)), tmp_path / "calls.txt"
    scenes = cli.find_scenes([str(root)])
    key_to_scene = {view_key(cli.load_views(files, 64)): name for name, files in scenes}
    command = [sys.executable, "-m", "met3r_diffusers.cli", "score", str(root), "--size", "64", "--quiet",
               "--metric-factory", "test_score_scale:counting_metric"]
    reference = tmp_path / "reference.json"
    subprocess.run([*command, "--out", str(reference)], env=_env(**{CALLS_ENV: str(tmp_path / "ref_calls.txt")}),
                   check=True, timeout=300)
    out, rng, kills = tmp_path / "report.json", random.Random(14), 0
    for run in range(12):
        recorded_before = _recorded(out)
        env = _env(**{CALLS_ENV: str(calls), DELAY_ENV: "0.05", RUN_ENV: str(run)})
        process = subprocess.Popen([*command, "--out", str(out), "--resume"], env=env)
        if run < 4:  # kill once 1-3 more scenes were scored, then up to 80 ms later
            target = (len(calls.read_text().splitlines()) if calls.exists() else 0) + rng.randint(1, 3)
            while process.poll() is None and (len(calls.read_text().splitlines()) if calls.exists() else 0) < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.08))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        code = process.wait(timeout=300)
        scored_now = [key_to_scene[line.split()[1]] for line in calls.read_text().splitlines()
                      if line.split()[0] == str(run)] if calls.exists() else []
        assert not set(scored_now) & recorded_before, "a recorded scene was scored again"
        if code == 0:
            break
        assert code == -signal.SIGKILL
    assert kills >= 2
    assert _scenes_of(out) == _scenes_of(reference)
    lines = calls.read_text().splitlines()
    assert len(lines) <= len(scenes) + kills  # a kill loses at most the scene in flight
    assert not cli.Journal.paths(out)


# ----------------------------------------------------------------------------- sharding under accelerate launch


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_equal_one(tmp_path):
    root = _scenes(tmp_path / "scenes")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert _score(str(root), "--out", str(one), "--batch-size", "2") == 0
    command = ["-m", "met3r_diffusers.cli", "score", str(root), "--size", "64", "--quiet", "--batch-size", "2",
               "--out", str(two)]
    env = _env(ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo",
               MET3R_DIFFUSERS_METRIC_FACTORY="met3r_diffusers.testing:tiny_met3r")
    result = _launch(2, *command, env=env)
    assert result.returncode == 0, _launch_failure(result)
    first, second = json.loads(one.read_text()), json.loads(two.read_text())
    assert second["scenes"] == first["scenes"]  # same order, bit-identical scores (JSON floats round-trip)
    assert second["mean_score"] == first["mean_score"] and second["complete"]
    assert second["provenance"]["num_processes"] == 2 and first["provenance"]["num_processes"] == 1
    assert second["provenance"]["timing"]["num_views"] == sum(len(s["views"]) for s in first["scenes"])
    assert not cli.Journal.paths(two)


_METRIC_SCRIPT = """
import json, sys, torch
from accelerate import PartialState
from met3r_diffusers import MEt3RMetric
from met3r_diffusers.testing import tiny_met3r
state = PartialState(cpu=True)
views = torch.rand(5, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
evaluator = MEt3RMetric(tiny_met3r(), pairs="adjacent")
shard = views[state.process_index :: state.num_processes]  # 3 samples on rank 0, 2 on rank 1
evaluator.update(shard[:1])
evaluator.update(shard[1:])
result = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in evaluator.compute().items()}
result["num_processes"] = state.num_processes
json.dump(result, open(sys.argv[1] + f".{state.process_index}", "w"))
state.wait_for_everyone()
torch.distributed.destroy_process_group()  # gloo's threads abort at exit otherwise ("terminate called ...")
"""


@pytest.mark.slow
def test_met3r_metric_under_accelerate_launch_equals_one_process(tmp_path):
    script = tmp_path / "evaluate.py"
    script.write_text(_METRIC_SCRIPT)
    env = _env(ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo")
    result = _launch(2, str(script), str(tmp_path / "result"), env=env)
    assert result.returncode == 0, _launch_failure(result)
    views = torch.rand(5, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    single = MEt3RMetric(tiny_met3r(), pairs="adjacent")
    single.update(views)
    expected = single.compute()
    for rank in (0, 1):
        got = json.loads((tmp_path / f"result.{rank}").read_text())
        assert got["num_processes"] == 2 and got["num_samples"] == 5 and got["num_empty"] == int(expected["num_empty"])
        assert got["score"] == pytest.approx(float(expected["score"]), abs=1e-6)
        assert got["pair_scores"] == pytest.approx(expected["pair_scores"].tolist(), abs=1e-6)
        assert got["overlap_fraction"] == pytest.approx(float(expected["overlap_fraction"]), abs=1e-6)


# ----------------------------------------------------------------------------- low overlap


def test_low_overlap_pairs_are_flagged_and_left_out_of_the_scene_score(tmp_path, capsys):
    _write_scene(tmp_path / "scene", 3, seed=0, width=64)
    out = tmp_path / "report.json"
    assert _score(str(tmp_path / "scene"), "--pairs", "all", "--out", str(out),
                  factory="test_score_scale:shifted_metric") == 0
    report = json.loads(out.read_text())
    (scene,) = report["scenes"]
    flags = {(p["i"], p["j"]): p["low_overlap"] for p in scene["pairs"]}
    assert flags == {(0, 1): False, (0, 2): True, (1, 2): False}
    overlaps = {(p["i"], p["j"]): p["overlap"] for p in scene["pairs"]}
    assert overlaps[(0, 2)] == pytest.approx(2 / 64) and overlaps[(0, 1)] == pytest.approx(33 / 64)
    kept = [p["score"] for p in scene["pairs"] if not p["low_overlap"]]
    assert scene["pairs"][1]["score"] is not None  # still reported
    assert scene["score"] == pytest.approx(sum(kept) / 2, abs=1e-6)
    assert report["num_low_overlap_pairs"] == 1 and "min_overlap=0.05" in report["warnings"][0]
    assert report["settings"]["min_overlap"] == cli.DEFAULT_MIN_OVERLAP
    assert "left out" in capsys.readouterr().err
    assert _score(str(tmp_path / "scene"), "--pairs", "all", "--out", str(out), "--min-overlap", "0",
                  factory="test_score_scale:shifted_metric") == 0
    report = json.loads(out.read_text())
    assert report["num_low_overlap_pairs"] == 0 and not report["warnings"]
    assert report["scenes"][0]["score"] == pytest.approx(sum(p["score"] for p in report["scenes"][0]["pairs"]) / 3)


def test_metric_min_overlap_treats_low_pairs_as_empty():
    metric = tiny_met3r()
    views = (torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_(True)
    plain = metric(views, pairs="all")
    threshold = float(plain.overlap_fraction.median())
    low = plain.overlap_fraction < threshold
    assert low.any() and (~low).any()
    out = metric(views, pairs="all", min_overlap=threshold)
    assert torch.equal(out.valid, plain.valid & ~low) and torch.equal(out.overlap_fraction, plain.overlap_fraction)
    assert out.pair_scores[low].isnan().all()
    torch.testing.assert_close(out.pair_scores[~low], plain.pair_scores[~low])
    kept = torch.where(~low, plain.pair_scores, torch.zeros_like(plain.pair_scores))
    expected = kept.sum(1) / (~low).sum(1).clamp_min(1)
    expected = torch.where((~low).any(1), expected, torch.full_like(expected, float("nan")))
    torch.testing.assert_close(out.score, expected, equal_nan=True)
    zero = metric(views, pairs="all", min_overlap=threshold, empty="zero")
    assert (zero.pair_scores[low] == 0).all() and torch.isfinite(zero.score).all()
    zero.score.sum().backward()
    assert torch.isfinite(views.grad).all()
    torch.testing.assert_close(metric(views, pairs="all", min_overlap=0).score, plain.score)
    with pytest.raises(ValueError, match="min_overlap"):
        metric(views, min_overlap=1.5)


# ----------------------------------------------------------------------------- per-scene isolation, checks


def test_every_per_scene_failure_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    root = tmp_path / "scenes"
    _write_scene(root / "a_good", 2, seed=0)
    _write_scene(root / "b_bomb", 2, seed=1)
    Image.new("RGB", (300, 300)).save(root / "b_bomb" / "view_1.png")
    (root / "c_single").mkdir()
    Image.new("RGB", (64, 64)).save(root / "c_single" / "only.png")
    long_name = "d_" + "x" * 200
    _write_scene(root / long_name, 2, seed=3)
    for k in range(2):  # view names of 120 bytes: heatmap names would be far over 255 bytes
        (root / long_name / f"view_{k}.png").rename(root / long_name / (f"{k}_" + "v" * 118 + ".png"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200)
    out, maps = tmp_path / "report.json", tmp_path / "maps"
    code = _score(str(root), "--out", str(out), "--heatmaps", str(maps))
    assert code == cli.EXIT_FAILED_SCENES
    report = json.loads(out.read_text())
    errors = {s["scene"].split("/")[-1]: s.get("error") for s in report["scenes"]}
    assert report["complete"] and report["num_scenes"] == 4 and report["num_errors"] == 2
    assert errors["a_good"] is None and errors[long_name] is None
    assert "decompression bomb" in errors["b_bomb"] and "view_1.png" in errors["b_bomb"]
    assert "at least 2 views" in errors["c_single"]
    names = sorted(p.name for p in maps.glob("*.png"))
    assert len(names) == 2 and all(len(n.encode()) <= 255 for n in names) and names[1].startswith("0003_d_xxx")
    assert cli.heatmap_name(3, long_name, "a", "b") != cli.heatmap_name(3, long_name + "y", "a", "b")


def test_a_scene_the_metric_fails_on_fails_alone(tmp_path, monkeypatch):
    root = _scenes(tmp_path / "scenes", views=(2, 2, 2))
    original = cli.Scorer.__call__

    def fail_on_second(self, views):
        if any(abs(float(v.double().sum()) - target) < 1e-3 for v in views):
            raise RuntimeError("out of memory (simulated)")
        return original(self, views)

    target = float(cli.load_views(cli.find_scenes([str(root / "s01")])[0][1], 64).double().sum())
    monkeypatch.setattr(cli.Scorer, "__call__", fail_on_second)
    out = tmp_path / "report.json"
    assert _score(str(root), "--out", str(out), "--batch-size", "3") == cli.EXIT_FAILED_SCENES
    report = json.loads(out.read_text())
    assert [s.get("error") is None for s in report["scenes"]] == [True, False, True]
    assert "out of memory" in report["scenes"][1]["error"]


def test_bad_outputs_devices_and_distances_exit_2_before_the_models_load(tmp_path, monkeypatch):
    def never(args):
        raise AssertionError("the metric was built")

    monkeypatch.setattr(cli, "build_metric", never)
    root = _scenes(tmp_path / "scenes", views=(2,))
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.json").mkdir()
    cases = [
        (["--out", str(tmp_path / "afile" / "report.json")], "cannot write there"),
        (["--out", str(tmp_path / "adir.json")], "is a directory"),
        (["--heatmaps", str(tmp_path / "afile")], "--heatmaps .* is a file"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
        (["--min-overlap", "2"], "--min-overlap"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message) as error:
            cli.main(["score", str(root), *extra])
        assert error.value.code == 2
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchmetrics" else real_find_spec(name, *a))
    with pytest.raises(SystemExit, match="needs the torchmetrics package") as error:
        cli.main(["score", str(root), "--distance", "ssim"])
    assert error.value.code == 2


def test_usage_errors_are_one_line_with_exit_status_2_in_a_subprocess(tmp_path):
    root = _scenes(tmp_path / "scenes", views=(2,))
    result = subprocess.run([sys.executable, "-m", "met3r_diffusers.cli", "score", str(root), "--out",
                             str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "is a directory" in result.stderr


def test_provenance_records_versions_settings_and_times(tmp_path):
    root = _scenes(tmp_path / "scenes", views=(2, 2))
    out = tmp_path / "report.json"
    assert _score(str(root), "--out", str(out), "--chunk-size", "1", "--symmetric") == 0
    report = json.loads(out.read_text())
    provenance = report["provenance"]
    assert set(provenance["versions"]) >= {"met3r-diffusers", "torch", "diffusers", "huggingface_hub"}
    assert provenance["versions"]["torch"] == torch.__version__
    assert provenance["device"] == "cpu" and provenance["dtype"] == "float32" and provenance["num_processes"] == 1
    assert provenance["networks"] == {"metric_factory": "met3r_diffusers.testing:tiny_met3r"}
    assert provenance["start_time"] <= provenance["end_time"]
    assert set(report["settings"]) == set(cli.SCORING_SETTINGS)
    assert report["settings"]["chunk_size"] == 1 and report["settings"]["symmetric"]
    assert provenance["run"]["batch_size"] == 1 and provenance["timing"]["num_views"] == 4


# ----------------------------------------------------------------------------- parser and download


def test_help_shows_every_default_and_version(capsys):
    for command in (["score", "--help"], ["download", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(command)
        text = capsys.readouterr().out.split("options:")[1]
        entries = re.split(r"\n  (?=-)", text)  # one entry per option
        options = [entry for entry in entries if entry.strip().startswith("--") and "--help" not in entry[:12]]
        assert len(options) >= (20 if command[0] == "score" else 4)
        for entry in options:
            assert "(default:" in " ".join(entry.split()), entry
    with pytest.raises(SystemExit) as error:
        cli.main(["--version"])
    assert error.value.code == 0 and "met3r-diffusers 0.1.0" in capsys.readouterr().out


def test_download_prints_or_writes_the_json_and_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from met3r_diffusers import hub

    fetched = {"featup": {"path": "/c/f.ckpt", "sha256": "ab", "source": "https://x/f.ckpt"}}
    seen = {}

    def fake_download(**kwargs):
        seen.update(kwargs)
        return fetched

    monkeypatch.setattr(hub, "download_weights", fake_download)
    assert cli.main(["download", "--backbone", "dust3r", "--no-norm", "--revision", "v1"]) == 0
    assert json.loads(capsys.readouterr().out) == fetched
    assert seen == {"backbone": "dust3r", "use_norm": False, "cache_dir": None, "revision": "v1"}
    assert cli.main(["download", "--out", str(tmp_path / "w.json")]) == 0
    assert json.loads((tmp_path / "w.json").read_text()) == fetched

    def offline(**kwargs):
        raise FileNotFoundError("Could not get config.json: offline mode\nTo provide them: ...")

    monkeypatch.setattr(hub, "download_weights", offline)
    assert cli.main(["download"]) == cli.EXIT_WEIGHTS
    err = capsys.readouterr().err
    assert err.strip() == "met3r-diffusers: download failed: Could not get config.json: offline mode"


def test_download_offline_for_real_fails_fast(tmp_path):
    env = _env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "th"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "met3r_diffusers.cli", "download", "--cache-dir",
                             str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "download failed" in result.stderr and time.perf_counter() - start < 60
