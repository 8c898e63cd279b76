"""`raydiology bench step` on CPU with the smoke profile: the GPU check's code path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raydiology.bench.step import run_step_benchmark
from raydiology.config import load_experiment

REPO = Path(__file__).resolve().parents[1]


def test_bench_step_times_real_steps_with_torch() -> None:
    exp = load_experiment(REPO / "experiments/hd_mae_cam.yaml", profile="smoke")
    result = run_step_benchmark(exp, steps=3, warmup=1, engine="torch")
    assert result["engine"] == "torch" and result["device"] == "cpu"
    assert result["steps_timed"] == 3 and result["step_time_s_median"] > 0
    assert result["images_per_s"] == pytest.approx(
        exp.train.micro_batch_size / result["step_time_s_median"], rel=0.01
    )
    assert result["parameters"]["total"] == result["parameters"]["trainable"] > 0
    assert all(loss == loss for loss in result["loss_first_last"])  # not NaN


def test_bench_step_module_runs_deepspeed_without_ray() -> None:
    # The GPU machines have torch but no Ray: the module entry point needs neither Ray nor typer.
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['ray'] = None; "
         "from raydiology.bench.step import main; main(sys.argv[1:])",
         str(REPO / "experiments/hd_mae_cam.yaml"), "--profile", "smoke",
         "--steps", "2", "--warmup", "1", "--engine", "deepspeed"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["engine"] == "deepspeed" and result["zero_stage"] == 2
