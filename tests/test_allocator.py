"""tune_cpu_allocator: freed large blocks are reused without page faults; bad input; CLI default."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from met3r_diffusers import tune_cpu_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh interpreter: 20 rounds of allocating, touching and freeing a 256 MiB and a 64 MiB tensor
# (the shape of a metric call's large temporaries); minor page faults per round.
_PROBE = """
import json, resource, sys, torch
from met3r_diffusers import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else None
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(64 * 2**20), torch.ones(16 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x, y
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_tuned_allocator_reuses_freed_memory_without_page_faults():
    default, tuned = _probe("default"), _probe("tuned")
    pages = 320 * 2**20 // 4096
    # glibc's default maps every large block afresh: each round faults in all its pages again
    assert all(count >= pages // 2 for count in default["faults"]), default
    # tuned: the heap grows for a few rounds (torch's aligned requests do not fit a freed block of
    # exactly their size), then the freed blocks are reused and the rounds stop faulting
    assert tuned["applied"] is True
    assert sum(tuned["faults"][10:]) < pages // 10, tuned


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_restoring_defaults_returns_true_and_is_repeatable():
    # run in a child so this test process keeps its allocator as it was
    code = ("from met3r_diffusers import tune_cpu_allocator as t; "
            "print(t(), t(), t(False), t(False))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True", "True"]


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_enable_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="enable"):
        tune_cpu_allocator(bad)


def test_non_glibc_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    assert tune_cpu_allocator() is False
