"""A finished (or partly finished) sweep's results: one row per trial, read back from the trial
run directories (so a resumed sweep's table covers every trial), a markdown and a CSV table
sorted by the metric, the best trial's config as a ready-to-run experiment file, and plots."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from raydiology.tune.spec import NOT_SET, TRIALS_DIR, YARDSTICK_METRICS, Plan, assignment

COST_COLUMNS = ("images_per_s", "wall_s", "cpu_hours", "gpu_hours")
_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(?:_|$)")


def collect(plan: Plan, grid: Any = None) -> list[dict[str, Any]]:
    """Rows of every trial, sorted best first by the sweep's metric (missing values last).

    status: finished (trained to the end), stopped (ASHA or a killed driver), error."""
    from raydiology.config import experiment_from_dict
    from raydiology.train.launch import read_metrics
    from raydiology.tune.runner import COST_FILE, TRIAL_FILE, trial_cost

    cfg = plan.config
    keys = list(cfg.search)
    errors: dict[str, str] = {}
    configs: dict[str, dict[str, Any]] = {}
    for result in grid or []:
        match = _TRIAL_ID.search(Path(result.path).name)
        tid = (result.metrics or {}).get("trial_id") or (match.group(1) if match else "?")
        configs[tid] = assignment(result.config or {})
        if result.error is not None:
            errors[tid] = str(result.error).strip().splitlines()[-1][:200]

    rows = []
    trials = Path(plan.sweep_dir) / TRIALS_DIR
    for run_dir in sorted(trials.glob(f"*/{TRIAL_FILE}")):
        run_dir = run_dir.parent
        info = json.loads((run_dir / TRIAL_FILE).read_text())
        tid = info["trial_id"]
        metrics = read_metrics(run_dir)
        last = metrics[-1] if metrics else {}
        final = info.get("final") or {}
        exp = experiment_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        trained = last.get("step", 0) >= exp.train.max_steps
        status = "finished" if final or trained else "error" if tid in errors else "stopped"
        has_cost = (run_dir / COST_FILE).is_file()
        row: dict[str, Any] = {"trial": tid, "status": status}
        row.update({k: info["values"].get(k, NOT_SET) for k in keys})
        row[cfg.metric] = final.get(cfg.metric, last.get(cfg.metric))
        if cfg.probe is not None:  # both yardstick figures, whichever one ranks
            row.update({m: final.get(m) for m in YARDSTICK_METRICS if m != cfg.metric})
        if cfg.metric != "loss":
            row["loss"] = last.get("loss")
        row["step"] = last.get("step", 0)
        row.update(trial_cost(exp, run_dir) if has_cost else dict.fromkeys(COST_COLUMNS, 0.0))
        row["error"] = errors.get(tid, "")
        row["run_dir"] = str(run_dir)
        rows.append(row)
    for tid, error in errors.items():  # failed before making its run directory
        if not any(r["trial"] == tid for r in rows):
            values = configs.get(tid, {})
            row = {"trial": tid, "status": "error", **{k: values.get(k, NOT_SET) for k in keys}}
            rows.append({**row, cfg.metric: None, "step": 0, "error": error, "run_dir": ""})
    return sort_rows(rows, cfg.metric, cfg.mode)


def sort_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    def key(row: dict[str, Any]) -> tuple[int, float]:
        v = row.get(metric)
        if not isinstance(v, (int, float)) or math.isnan(v):
            return (1, 0.0)
        return (0, v if mode == "min" else -v)

    return sorted(rows, key=key)


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The best finished trial (an early-stopped trial's value is from fewer steps)."""
    scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
    finished = [r for r in scored if r["status"] == "finished"]
    ranked = finished or scored
    return ranked[0] if ranked else None


def write_results(plan: Plan, grid: Any = None, *, console: Console | None = None):
    """results.md, results.csv, best.yaml and plots/ in the sweep folder; returns the rows."""
    console = console or Console()
    cfg = plan.config
    out = Path(plan.sweep_dir)
    rows = collect(plan, grid)
    columns = _columns(rows)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows, [c for c in columns if c not in ("run_dir", "error")])
    best = best_row(rows, cfg.metric)
    head = [
        f"# Sweep {cfg.name}: {cfg.metric} ({cfg.mode}), {len(rows)} trials",
        "",
        f"- base: `{cfg.base}`" + (f", profile `{plan.profile}`" if plan.profile else ""),
        f"- scheduler: {cfg.scheduler.name}"
        + (
            f" (grace {cfg.scheduler.grace_period:g} {cfg.scheduler.time_attr}s, "
            f"reduction factor {cfg.scheduler.reduction_factor:g})"
            if cfg.scheduler.name == "asha"
            else ""
        ),
        f"- best: trial {best['trial']} -> `best.yaml`" if best else "- best: none yet",
        "",
        "",
    ]
    errors = [f"- {r['trial']}: {r['error']}" for r in rows if r.get("error")]
    (out / "results.md").write_text(
        "\n".join(head) + table + ("\n\nErrors:\n" + "\n".join(errors) if errors else "") + "\n"
    )
    if best is not None and best["run_dir"]:
        write_best_config(plan, best)
    plot_results(plan, rows, out / "plots")
    console.print(table)
    console.print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'plots'}")
    if best is not None:
        console.print(f"best: trial {best['trial']}  {cfg.metric} {_fmt(best[cfg.metric])}  ->  "
                      f"{out / 'best.yaml'}")  # fmt: skip
    return rows


def write_best_config(plan: Plan, best: dict[str, Any]) -> Path:
    """The best trial's resolved config as a new experiment: its own name, and the base
    experiment's output folder (not the trial's, which running it would resume)."""
    from raydiology.config import experiment_from_dict

    cfg = plan.config
    raw = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
    raw["name"] = f"{cfg.name}_best"
    raw["output"] = {"dir": (plan.base_raw.get("output") or {}).get("dir", "runs"), "name": None}
    experiment_from_dict(raw)  # it must load as it is
    swept = ", ".join(f"{k}={best[k]}" for k in cfg.search if best.get(k) != NOT_SET)
    header = (
        f"# Best trial of sweep {cfg.name} ({Path(plan.sweep_dir).name}): trial {best['trial']}, "
        f"{cfg.metric} {_fmt(best[cfg.metric])} ({cfg.mode})\n# {swept}\n"
        + (f"# profile {plan.profile} applied\n" if plan.profile else "")
    )
    path = Path(plan.sweep_dir) / "best.yaml"
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def plot_results(plan: Plan, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """metric_vs_<key>.png for each swept key and metric_vs_cost.png (device-hours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = plan.config
    folder.mkdir(parents=True, exist_ok=True)
    scored = [r for r in rows if isinstance(r.get(cfg.metric), (int, float))]
    colors = {"finished": "tab:blue", "stopped": "tab:orange", "error": "tab:red"}
    paths = []
    for key in cfg.search:
        points = [(r[key], r[cfg.metric], r["status"]) for r in scored if r[key] != NOT_SET]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in points)
        if numeric:
            xs = [float(x) for x, _, _ in points]
        else:
            labels = sorted({str(x) for x, _, _ in points})
            xs = [float(labels.index(str(x))) for x, _, _ in points]
            ax.set_xticks(range(len(labels)), labels)
        for status, color in colors.items():
            sel = [(x, y) for x, (_, y, s) in zip(xs, points, strict=True) if s == status]
            if sel:
                ax.scatter(*zip(*sel, strict=True), color=color, label=status)
        if (
            numeric
            and cfg.search[key]
            and isinstance(cfg.search[key], dict)
            and "loguniform" in cfg.search[key]
        ):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(cfg.metric)
        ax.set_title(f"{cfg.name}: {cfg.metric} vs {key.split('.')[-1]}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"metric_vs_{key.replace('.', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    gpu = any(r.get("gpu_hours", 0) for r in scored)
    cost_key = "gpu_hours" if gpu else "cpu_hours"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for status, color in colors.items():
        sel = [(r[cost_key], r[cfg.metric]) for r in scored if r["status"] == status]
        if sel:
            ax.scatter(*zip(*sel, strict=True), color=color, label=status)
    for r in scored:
        ax.annotate(r["trial"][-3:], (r[cost_key], r[cfg.metric]), fontsize=7)
    ax.set_xlabel(cost_key.replace("_", "-"))
    ax.set_ylabel(cfg.metric)
    ax.set_title(f"{cfg.name}: {cfg.metric} vs cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "metric_vs_cost.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [*paths, path]


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return columns


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
