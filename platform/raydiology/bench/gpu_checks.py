"""The GPU check of issue 14 as one command: `raydiology run` on one GPU worker under Ray
Train, then the same configs through `bench step`, writing a JSON file per check.

    python -m raydiology.bench.gpu_checks --out DIR [--budget-s 600] [--only NAME ...]
    python -m raydiology.bench.gpu_checks --out DIR --smoke      # the same path on CPU, tiny

Each run check trains a few dozen steps on a phantom corpus made at the experiment's
resolution (checkpoint + export at the end), then reruns the same run name with more steps
to check the resume; it records img/s, data wait and peak GPU memory from `metrics.jsonl`,
and `bench step --engine torch` / `--engine deepspeed` on the same config beside it. Checks
run in order until `--budget-s` is spent; results are written as each one ends, so a run cut
short by the device's time limit still returns what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
EXPERIMENTS = REPO / "experiments"

# name -> (experiment file, overrides for one GPU worker and a short run)
RUNS: dict[str, tuple[str, list[str]]] = {
    "hd_mae_l_cam_1280": ("hd_mae_cam.yaml", []),
    "vision_mamba_b_arg_192": ("mambaxray_vl/stage1_arg.yaml", []),
    "evax_b": ("evax.yaml", ["model.flavor=b"]),
    "dinov2_b14": ("xr0_dinov2.yaml", []),
    "llama2_7b_sft_zero3": ("mambaxray_vl/stage3_sft.yaml", []),
}
# bench step only: HD-MAE-L micro-batch curve, Vision Mamba with and without the fast scan
CURVE = (16, 32, 64, 128)
SMOKE_PROFILES = {"mambaxray_vl/stage3_sft.yaml": "sft_smoke"}


def run_overrides(out: Path, *, smoke: bool, steps: int) -> list[str]:
    common = [
        f"output.dir={out / 'runs'}",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={steps}",
        "train.schedule.warmup_steps=1",  # the papers warm up for longer than a check runs
        "train.log_every=5",
        "scaling.num_workers=1",
        "scaling.max_failures=0",
    ]
    if smoke:
        return [*common, "scaling.use_gpu=false", "scaling.cpus_per_worker=1"]
    return [*common, "scaling.use_gpu=true", "scaling.cpus_per_worker=8",
            "data.phantom.images=256"]  # fmt: skip


def check_run(name: str, out: Path, *, smoke: bool, steps: int) -> dict[str, Any]:
    """`raydiology run` twice under one run name: train + checkpoint + export, then resume."""
    path, extra = RUNS[name]
    base = [str(EXPERIMENTS / path), *_profile(path, smoke)]
    sets = [*run_overrides(out, smoke=smoke, steps=steps), *extra, f"output.name=gpu-{name}"]
    if not smoke:  # the phantom corpus at the experiment's own resolution
        sets.append(f"data.phantom.size={_resolution(path, extra)}")
    first = _cli(["run", *base, *_sets(sets)])
    longer = [*_sets([*sets, f"train.max_steps={steps + 5}"]), "--allow-changes", "train.max_steps"]
    resumed = _cli(["run", *base, *longer])
    run_dir = out / "runs" / f"gpu-{name}"
    rows = _metrics(run_dir)
    trained = [r for r in rows if r.get("step", 0) <= steps]
    after = [r for r in rows if r.get("step", 0) > steps]
    last = trained[-1] if trained else {}
    return {
        "check": name,
        "run": first | {"metrics_last": last},
        "images_per_s": last.get("images_per_s"),
        "data_wait_s_per_step": last.get("data_wait_s_per_step"),
        "peak_memory_gib": max(peaks) if (peaks := _column(rows, "peak_memory_gib")) else None,
        "checkpoint": any("checkpoint" in r for r in trained),
        "export": (run_dir / "export").is_dir(),
        "resume": resumed
        | {"first_step_after": after[0]["step"] if after else None, "final": _summary(run_dir)},
        "bench_step_torch": _bench(base, extra, engine="torch"),
        "bench_step_deepspeed": _bench(base, extra, engine="deepspeed"),
    }


def check_curve(out: Path, *, smoke: bool) -> dict[str, Any]:
    """HD-MAE-L micro-batch scaling through the engine `raydiology run` builds."""
    base = [str(EXPERIMENTS / "hd_mae_cam.yaml"), *_profile("hd_mae_cam.yaml", smoke)]
    sizes = (2, 4) if smoke else CURVE
    return {
        "check": "hd_mae_micro_batch_curve",
        "points": [
            _bench(base, [f"train.micro_batch_size={b}"], engine=engine)
            for b in sizes
            for engine in ("deepspeed", "torch")
        ],
        "compile": _bench(base, ["train.compile=true"], engine="deepspeed"),
    }


def check_scan(out: Path, *, smoke: bool) -> dict[str, Any]:
    """Vision Mamba-B ARG steps with the reference scan and the fast one, and the scan alone."""
    path = "mambaxray_vl/stage1_arg.yaml"
    base = [str(EXPERIMENTS / path), *_profile(path, smoke)]
    # Vision Mamba-B's scan: 768 channels (expand 1), 145 tokens, the paper's batch 128
    paper = [
        "--device",
        "cuda",
        "--batch",
        "128",
        "--length",
        "145",
        "--dim",
        "768",
        "--dtype",
        "bf16",
    ]
    tiny = ["--batch", "2", "--length", "64", "--dim", "32", "--repeats", "2"]
    return {
        "check": "vision_mamba_scan",
        "reference": _bench(base, ["model.scan=reference"], engine="deepspeed"),
        "fast": _bench(base, ["model.scan=auto"], engine="deepspeed"),
        "scan_alone": _module("raydiology.bench.scan", tiny if smoke else paper),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny flavors on CPU")
    parser.add_argument("--only", action="append", help="check names (default: all)")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    checks: dict[str, Any] = {
        "curve": lambda: check_curve(out, smoke=args.smoke),
        "scan": lambda: check_scan(out, smoke=args.smoke),
        **{
            name: (lambda n=name: check_run(n, out, smoke=args.smoke, steps=args.steps))
            for name in RUNS
        },
    }
    deadline = time.monotonic() + args.budget_s
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        if time.monotonic() > deadline:
            print(f"skipped {name}: --budget-s spent", file=sys.stderr)
            continue
        started = time.monotonic()
        try:
            result = check()
        except Exception as error:  # one broken check must not lose the others' figures
            result = {"check": name, "error": f"{type(error).__name__}: {error}"}
        result["wall_s"] = round(time.monotonic() - started, 1)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"{name}: {result['wall_s']} s -> {out / f'{name}.json'}", file=sys.stderr)
    return 0


def _profile(path: str, smoke: bool) -> list[str]:
    return ["--profile", SMOKE_PROFILES.get(path, "smoke")] if smoke else []


def _sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def _resolution(path: str, extra: list[str]) -> int:
    from raydiology.config import load_experiment

    return load_experiment(EXPERIMENTS / path, overrides=extra).data.resolution


def _cli(args: list[str]) -> dict[str, Any]:
    return _process([sys.executable, "-m", "raydiology.cli", *args])


def _module(module: str, args: list[str]) -> dict[str, Any]:
    result = _process([sys.executable, "-m", module, *args])
    stdout = result["stdout"]
    if "{" in stdout:
        try:
            result["json"] = json.loads(stdout[stdout.index("{") :])
            del result["stdout"]
        except ValueError:
            pass
    return result


def _bench(base: list[str], overrides: list[str], *, engine: str) -> dict[str, Any]:
    args = [*base, *_sets(overrides), "--steps", "5", "--warmup", "2", "--engine", engine]
    return _module("raydiology.bench.step", args)


def _process(command: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=os.environ)
    return {
        "returncode": proc.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "stdout": proc.stdout[-4000:],
        "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
    }


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _column(rows: list[dict[str, Any]], key: str) -> list[Any]:
    return [row[key] for row in rows if row.get(key) is not None]


def _summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()).get("metrics") if path.exists() else None


if __name__ == "__main__":
    sys.exit(main())
