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


def _bench_step_process(*args: str) -> dict:
    """The module entry point in a fresh process (DeepSpeed's process group stays there)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}
    proc = subprocess.run(
        [sys.executable, "-m", "raydiology.bench.step", *args],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def test_bench_step_bf16_batchnorm_trunk_under_deepspeed() -> None:
    # DeepSpeed casts parameters to bf16 but keeps BatchNorm statistics fp32; MedViLL's
    # ResNet trunk failed this way on the GPU check until match_norm_buffers.
    result = _bench_step_process(
        str(REPO / "experiments/medvill.yaml"), "--profile", "medvill_smoke",
        "--set", "train.precision=bf16", "--steps", "1", "--warmup", "1",
        "--engine", "deepspeed", "--set", "train.optimizer.kernel=torch",
    )  # fmt: skip
    assert result["precision"] == "bf16" and all(x == x for x in result["loss_first_last"])


def test_bench_validation_times_one_batch_of_report_decoding() -> None:
    from raydiology.bench.step import run_validation_benchmark

    exp = load_experiment(
        REPO / "experiments/r2gengpt.yaml",
        profile="sft_smoke",
        overrides=["objective.generation.batch_size=4", "objective.generation.max_new_tokens=8"],
    )
    result = run_validation_benchmark(exp, repeats=1)
    assert result["images"] == 4 and result["batch_time_s_median"] > 0
    assert 0 < result["words_per_report"] <= 8


def test_deepspeed_takes_torchs_fused_adamw_at_zero0_in_bf16() -> None:
    # The GPU default where DeepSpeed has no prebuilt FusedAdam: torch's fused AdamW handed
    # to the engine ready-made, under bf16 and ZeRO-0 (the paper ViTs' stage).
    result = _bench_step_process(
        str(REPO / "experiments/hd_mae_cam.yaml"), "--profile", "smoke",
        "--set", "train.optimizer.kernel=torch_fused", "--set", "train.zero_stage=0",
        "--set", "train.precision=bf16", "--steps", "2", "--warmup", "1", "--engine", "deepspeed",
    )  # fmt: skip
    assert result["optimizer"] == "torch_fused" and result["zero_stage"] == 0
    first, last = result["loss_first_last"]
    assert first == first and last == last and last != first  # steps were taken


def test_optimizer_kernel_auto_resolves_per_device() -> None:
    from raydiology.config import OptimizerConfig
    from raydiology.train.deepspeed_config import deepspeed_config, optimizer_kernel

    auto = OptimizerConfig()
    assert optimizer_kernel(auto, on_gpu=False) == "torch"
    # no DeepSpeed build with FusedAdam on this machine: torch's fused AdamW, no JIT build
    assert optimizer_kernel(auto, on_gpu=True) == "torch_fused"
    exp = load_experiment(REPO / "experiments/hd_mae_cam.yaml")
    assert "optimizer" not in deepspeed_config(exp.train, world_size=8, on_gpu=True)
    cpu = deepspeed_config(exp.train, world_size=2, on_gpu=False)
    assert cpu["optimizer"]["params"]["torch_adam"] is True
