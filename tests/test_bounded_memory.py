"""The streaming pipeline holds memory flat on a corpus several times its object store."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.ray
def test_memory_stays_flat_across_epochs_and_corpus_sizes() -> None:
    # Its own Ray (a 100 MB object store) in a subprocess: the session's Ray has a big one.
    proc = subprocess.run(
        [sys.executable, "-m", "raydiology.cli", "bench", "memory", "--images", "800",
         "--images", "3200", "--resolution", "256", "--epochs", "2",
         "--object-store-mb", "100", "--cpus", "2"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    small, large = json.loads(proc.stdout)["runs"]
    assert large["corpus_mb"] > 1.5 * large["object_store_mb"]  # does not fit the store
    for run in (small, large):
        assert [e["rows"] for e in run["epochs"]] == [run["images"]] * 2  # nothing lost
        first, second = (e["peak_memory_mb"] for e in run["epochs"])
        assert second < 1.25 * first, run  # no growth from epoch to epoch
    # 4x the images, about the same memory: it streams rather than materialises.
    assert large["peak_memory_mb"] < 1.3 * small["peak_memory_mb"], (small, large)
