"""What a job runs: an experiment (`raydiology run`) or a sweep (`raydiology sweep`), as CLI
arguments relative to the folder the job starts in (the uploaded working dir, or the image's
copy of the repository for a RayJob)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from raydiology.config_base import ConfigError


@dataclass(frozen=True)
class Workload:
    kind: Literal["experiment", "sweep"]
    name: str  # the experiment's name (a sweep: its own name or file stem)
    run: str  # the run name (output.name or the experiment name)
    args: list[str]  # `raydiology` arguments, e.g. ["run", "experiments/x.yaml", "--set", ...]
    output_dir: str | None  # the experiment's output.dir; None for a sweep


def is_sweep(raw: Any) -> bool:
    """A sweep file (experiments/sweeps/) searches over a base experiment: `base:` + `search:`."""
    return isinstance(raw, dict) and "base" in raw and "search" in raw


def load_workload(
    path: Path,
    *,
    root: Path,
    profile: str | None = None,
    sets: list[str] | None = None,
    cluster: str | None = None,
    extra: list[str] | None = None,
    output_root: str | None = None,
) -> Workload:
    """Validate `path` here (so a bad key fails before anything is uploaded) and build the
    command that runs it inside `root`.

    `cluster` adds `--cluster NAME` (its scaling preset) before the user's `--set`s, so those
    still win; `extra` are `raydiology run` options such as `--address auto`. `output_root`
    (shared storage on the cluster) becomes the run's output.dir, or the sweep's `--out`,
    unless the user's `--set output.dir=...` says otherwise.
    """
    path = Path(path)
    try:
        relative = path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        raise ConfigError(
            "experiment", str(path), f"a file inside {root} (the folder the job starts in)"
        ) from None
    raw = yaml.safe_load(path.read_text())
    options: list[str] = ["--profile", profile] if profile else []
    sets = sets or []
    if is_sweep(raw):
        from raydiology.tune.capacity import preset_sweep_sets
        from raydiology.tune.spec import make_plan

        # the preset travels as --set on the base experiment (what `sweep --cluster` does)
        overlay = preset_sweep_sets(cluster) if cluster else []
        plan = make_plan(path, profile=profile, sets=[*overlay, *sets])  # checks every trial
        for item in [*overlay, *sets]:
            options += ["--set", item]
        name = str(plan.sweep["name"])
        if output_root:
            options += ["--out", f"{output_root}/sweeps"]
        args = ["sweep", str(relative), *options, *(extra or [])]
        return Workload("sweep", name, name, args, str(plan.sweep["output"]["dir"]))

    from raydiology.cluster.presets import load_preset
    from raydiology.config import load_experiment

    overlay = load_preset(cluster).scaling_overrides() if cluster else []
    if output_root:
        sets = [f"output.dir={output_root}", *sets]
    exp = load_experiment(path, profile=profile, overrides=[*overlay, *sets])
    if cluster:
        options += ["--cluster", cluster]
    for item in sets:
        options += ["--set", item]
    args = ["run", str(relative), *options, *(extra or [])]
    return Workload("experiment", exp.name, exp.run_name, args, exp.output.dir)
