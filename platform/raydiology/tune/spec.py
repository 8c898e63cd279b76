"""The sweep file: a base experiment, a search space over its keys, the metric, the scheduler
and the resources, and the plan it expands to (every trial experiment validated up front).

A sweep file looks like::

    name: mask_ratio
    base: ../hd_mae_cam.yaml          # experiment file, relative to the sweep file
    metric: loss                      # what the table is sorted by (final value)
    mode: min
    search:                           # dotted experiment key -> domain
      objective.masking.strategy: {grid: [random, context_aware]}
      objective.masking.ratio: {grid: [0.75, 0.9], when: {objective.masking.strategy: random}}
      train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-3]}
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}
    resources: {parallel: 2}

Domains: `grid` (every value, crossed with the other grids), `choice` (one value drawn per
trial), `uniform` / `loguniform` ([low, high]). Conditional keys: `when: {key: value or
[values]}` sweeps a key only for the grid points where an earlier grid key has one of those
values; `{follows: key, values: {its value: this value}}` sets a key from an earlier grid key's
value (e.g. the patch size and batch size that go with a resolution).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raydiology.config import (
    Experiment,
    apply_override,
    deep_merge,
    experiment_from_dict,
    read_profile,
    resolve_raw,
)
from raydiology.config_base import ConfigError, check, from_dict, to_dict

KINDS = ("grid", "choice", "uniform", "loguniform", "follows")
NOT_SET = "(not swept)"  # a conditional key whose condition does not hold for this trial
TRIALS_DIR = "trials"  # raydiology run directories, one per trial
TUNE_DIR = "tune"  # Ray Tune's experiment state (what `--resume` restores)
PLAN_FILE = "plan.json"


@dataclass(kw_only=True)
class SchedulerConfig:
    """Early stopping. ASHA compares trials at rungs of `time_attr` (training steps)."""

    name: Literal["asha", "none"] = "asha"
    # Steps before a trial can be stopped; below 1, a fraction of max_t (scales with profiles)
    grace_period: float = 0.25
    reduction_factor: float = 2.0  # keep 1/reduction_factor of the trials at each rung
    max_t: int | None = None  # null = the trials' train.max_steps
    time_attr: str = "step"
    # What ASHA compares mid-run; null = the sweep metric when training reports it, else loss
    metric: str | None = None
    mode: Literal["min", "max"] | None = None

    def validate(self, key: str) -> None:
        check(
            self.grace_period > 0,
            f"{key}.grace_period",
            self.grace_period,
            "steps (>= 1) or a fraction of max_t (< 1)",
        )
        check(
            self.reduction_factor > 1,
            f"{key}.reduction_factor",
            self.reduction_factor,
            "greater than 1",
        )
        check(self.max_t is None or self.max_t >= 1, f"{key}.max_t", self.max_t, "at least 1")

    def grace_steps(self, max_t: int) -> int:
        g = self.grace_period
        return max(1, round(g * max_t) if g < 1 else int(g))


@dataclass(kw_only=True)
class ResourcesConfig:
    """Per trial: its Ray Train workers (overrides of the experiment's `scaling` section,
    applied before the profile) and the driver function that launches them."""

    parallel: int = 1  # trials at once
    driver_cpus: float = 0.0  # the driver only waits on its TorchTrainer
    num_workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    use_gpu: bool | None = None
    accelerator_type: str | None = None

    def validate(self, key: str) -> None:
        check(self.parallel >= 1, f"{key}.parallel", self.parallel, "at least 1")
        check(self.driver_cpus >= 0, f"{key}.driver_cpus", self.driver_cpus, ">= 0")

    def scaling_overrides(self) -> dict[str, Any]:
        names = ("num_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu", "accelerator_type")
        return {f"scaling.{n}": getattr(self, n) for n in names if getattr(self, n) is not None}


# Trial metrics measured on the finished trial's frozen encoder (not during training).
YARDSTICK_METRICS = ("probe_auroc", "retrieval_precision")


@dataclass(kw_only=True)
class ProbeMetricConfig:
    """The frozen-encoder yardstick on the trial's export after training, from one set of
    features: `probe_auroc` (an MLP probe, raydiology.evaluation.probe: mean test AUROC over
    the label columns) and `retrieval_precision` (test queries against the train gallery,
    raydiology.evaluation.retrieval: mean Precision@`retrieval_k`). By default both follow
    XR-0: its probe training (`protocol: xr0`) and its relevance (`match: any`, a shared
    disease); `protocol: raydiology-v1` / `match: exact` give this platform's first ones."""

    corpus: str | None = None  # labelled corpus folder; null = the trial's own corpus
    labels: tuple[str, ...] = ("label_*",)
    pool: Literal["cls", "mean"] = "cls"
    fraction: float = 1.0  # of the train split
    seeds: int = 1
    protocol: Literal["xr0", "raydiology-v1"] = "xr0"  # evaluation.probe.PROTOCOLS
    max_epochs: int | None = None  # null = the protocol's (xr0: 500)
    batch_size: int = 64  # images per embedding batch
    retrieval_k: int = 10
    match: Literal["any", "exact"] = "any"  # retrieval relevance (evaluation.retrieval)
    # Images of the corpus the yardstick embeds: a fixed sample (by image id) made once per
    # sweep; null = every image (one task embeds the whole corpus: slow on a large one)
    max_images: int | None = 2000

    def validate(self, key: str) -> None:
        check(self.retrieval_k >= 1, f"{key}.retrieval_k", self.retrieval_k, "at least 1")
        check(
            self.max_images is None or self.max_images >= 10,
            f"{key}.max_images",
            self.max_images,
            "at least 10 (a probe needs train and test images), or null for all",
        )
        check(0 < self.fraction <= 1, f"{key}.fraction", self.fraction, "a fraction in (0, 1]")
        check(self.seeds >= 1, f"{key}.seeds", self.seeds, "at least 1")
        check(
            self.max_epochs is None or self.max_epochs >= 1,
            f"{key}.max_epochs",
            self.max_epochs,
            "at least 1, or null for the protocol's",
        )
        check(bool(self.labels), f"{key}.labels", list(self.labels), "label columns or globs")


@dataclass(kw_only=True)
class SweepOutput:
    # Relative to the working directory, like an experiment's; on a cluster: shared storage
    dir: str = "runs/sweeps"
    # The sweep folder's name; null = the sweep's name. One folder per sweep: running the
    # sweep again resumes it (`raydiology sweep --fresh` refuses instead)
    name: str | None = None


@dataclass(kw_only=True)
class SweepConfig:
    name: str
    description: str = ""
    base: str  # the experiment file, relative to the sweep file
    # loss, a yardstick metric (YARDSTICK_METRICS: needs the `probe` section), or any
    # metric the training loop reports (e.g. val_score of a report SFT that validates)
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    search: dict[str, Any]
    fixed: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, every trial
    num_samples: int = 1  # times the grid is run (each with fresh draws of the sampled keys)
    seed: int | None = 0  # for the sampled keys; null = a fresh draw every time
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    max_retries: int = 0  # a failed trial is restarted this often (it resumes its checkpoint)
    probe: ProbeMetricConfig | None = None
    output: SweepOutput = field(default_factory=SweepOutput)

    def validate(self, key: str) -> None:
        check(bool(self.name), "name", self.name, "a non-empty sweep name")
        check(bool(self.search), "search", self.search, "at least one swept key")
        check(self.num_samples >= 1, "num_samples", self.num_samples, "at least 1")
        check(self.max_retries >= -1, "max_retries", self.max_retries, ">= -1 (-1 = forever)")
        yardstick = self.metric in YARDSTICK_METRICS
        check(
            not yardstick or self.probe is not None,
            "probe",
            None,
            f"a probe section (corpus, labels) when metric is {self.metric}",
        )
        check(not yardstick or self.mode == "max", "mode", self.mode, f"max for {self.metric}")


@dataclass(frozen=True, kw_only=True)
class Param:
    """One swept key: its domain and, optionally, the grid values it is swept under."""

    key: str
    kind: Literal["grid", "choice", "uniform", "loguniform", "follows"]
    values: tuple[Any, ...]  # grid/choice values, (low, high), or follows' (its, this) pairs
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    follows: str | None = None

    def applies(self, point: dict[str, Any]) -> bool:
        if self.follows is not None:
            return self.followed(point) is not NOT_SET
        return all(point.get(k, NOT_SET) in allowed for k, allowed in self.when)

    def followed(self, point: dict[str, Any]) -> Any:
        """For `follows`: this key's value at the grid point, or NOT_SET."""
        if self.follows not in point:
            return NOT_SET
        return dict(self.values).get(str(point[self.follows]), NOT_SET)

    def bounds(self) -> tuple[Any, ...]:
        """The values validation tries: every grid/choice value, both ends of a range."""
        return self.values

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return self.values[rng.randrange(len(self.values))]
        low, high = self.values
        if self.kind == "uniform":
            return rng.uniform(low, high)
        return math.exp(rng.uniform(math.log(low), math.log(high)))


def parse_search(search: dict[str, Any]) -> list[Param]:
    """The `search` mapping -> Params, in file order. A bare list is a grid."""
    params: list[Param] = []
    grid_keys: set[str] = set()
    for key, spec in search.items():
        k = f"search.{key}"
        if isinstance(spec, list):
            spec = {"grid": spec}
        if not isinstance(spec, dict):
            raise ConfigError(k, spec, f"a list (grid) or a mapping with one of {list(KINDS)}")
        kinds = [name for name in KINDS if name in spec]
        extra = sorted(set(spec) - set(KINDS) - {"when", "values"})
        check(len(kinds) == 1 and not extra, k, spec, f"exactly one of {list(KINDS)} (+ when)")
        kind = kinds[0]
        if kind == "follows":
            params.append(_follows(key, spec, grid_keys))
            grid_keys.add(key)
            continue
        values = spec[kind]
        check(
            isinstance(values, list) and len(values) >= 1,
            f"{k}.{kind}",
            values,
            "a non-empty list",
        )
        if kind in ("uniform", "loguniform"):
            ok = len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
            ok = ok and values[0] < values[1] and (kind == "uniform" or values[0] > 0)
            check(ok, f"{k}.{kind}", values, "[low, high] with low < high (low > 0 for log)")
        when = spec.get("when") or {}
        check(isinstance(when, dict), f"{k}.when", when, "a mapping of grid key -> value(s)")
        conditions = []
        for other, allowed in when.items():
            check(
                other in grid_keys,
                f"{k}.when",
                other,
                "a grid key listed before this one in `search`",
            )
            allowed = allowed if isinstance(allowed, list) else [allowed]
            conditions.append((other, tuple(allowed)))
        params.append(
            Param(key=key, kind=kind, values=tuple(values), when=tuple(conditions))  # type: ignore[arg-type]
        )
        if kind == "grid":
            grid_keys.add(key)
    return params


def _follows(key: str, spec: dict[str, Any], grid_keys: set[str]) -> Param:
    k = f"search.{key}"
    extra = sorted(set(spec) - {"follows", "values"})
    check(not extra, k, spec, "{follows: <earlier grid key>, values: {its value: this value}}")
    check(spec["follows"] in grid_keys, f"{k}.follows", spec["follows"],
          "a grid key listed before this one in `search`")  # fmt: skip
    values = spec.get("values")
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{k}.values", values, "a mapping of the followed key's values to this's")
    pairs = tuple((str(a), b) for a, b in values.items())
    return Param(key=key, kind="follows", values=pairs, follows=spec["follows"])


def grid_points(params: list[Param]) -> list[dict[str, Any]]:
    """Every combination of the grid keys; a conditional key only where its `when` holds."""
    points: list[dict[str, Any]] = [{}]
    for p in params:
        if p.kind == "follows":
            points = [{**pt, p.key: p.followed(pt)} if p.applies(pt) else pt for pt in points]
            continue
        if p.kind != "grid":
            continue
        grown: list[dict[str, Any]] = []
        for point in points:
            if p.applies(point):
                grown += [{**point, p.key: v} for v in p.values]
            else:
                grown.append(point)
        points = grown
    return points


def sampled_value(param: Param, point: dict[str, Any], rng: random.Random) -> Any:
    return param.draw(rng) if param.applies(point) else NOT_SET


def assignment(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial config -> {dotted key: value} of what this trial sets."""
    out = dict(config.get("grid") or {})
    out.update({k: v for k, v in (config.get("sampled") or {}).items() if v != NOT_SET})
    return out


# ----------------------------------------------------------------------------- the plan


@dataclass(kw_only=True)
class Plan:
    """What a sweep will run, resolved and validated; saved in the sweep folder for --resume.

    `base_raw` is the trials' common experiment (base file + fixed + resources + profile +
    --set); a trial adds its assignment, then its run directory (`sweep_dir/trials/<id>`).
    """

    sweep: dict[str, Any]  # the sweep file, typed and back to a dict
    sweep_file: str
    profile: str | None
    sets: list[str]
    base_raw: dict[str, Any]
    sweep_dir: str
    points: list[dict[str, Any]]

    @property
    def config(self) -> SweepConfig:
        return sweep_from_dict(self.sweep)

    @property
    def params(self) -> list[Param]:
        return parse_search(self.sweep["search"])

    def trial_raw(self, values: dict[str, Any], run_name: str) -> dict[str, Any]:
        raw = _apply(self.base_raw, values)
        return _apply(
            raw, {"output.dir": str(Path(self.sweep_dir) / TRIALS_DIR), "output.name": run_name}
        )

    def trial_experiment(self, values: dict[str, Any], run_name: str) -> Experiment:
        return experiment_from_dict(self.trial_raw(values, run_name))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def differences(self, other: Plan) -> list[str]:
        """What makes `other` another sweep than this one (where its file lives aside)."""
        mine, theirs = self.to_dict(), other.to_dict()
        names = ("sweep", "profile", "sets", "base_raw", "points")
        out = [n for n in names if json.dumps(mine[n], sort_keys=True, default=str)
               != json.dumps(theirs[n], sort_keys=True, default=str)]  # fmt: skip
        if "sweep" in out:  # say which keys of the sweep file
            a, b = mine["sweep"], theirs["sweep"]
            keys = sorted(k for k in {*a, *b} if json.dumps(a.get(k), sort_keys=True, default=str)
                          != json.dumps(b.get(k), sort_keys=True, default=str))  # fmt: skip
            out[out.index("sweep")] = ", ".join(keys)
        return out

    def save(self) -> None:
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.sweep_dir) / PLAN_FILE).write_text(json.dumps(self.to_dict(), indent=2))
        (Path(self.sweep_dir) / "sweep.yaml").write_text(
            yaml.safe_dump(self.sweep, sort_keys=False)
        )

    @classmethod
    def load(cls, sweep_dir: str | Path) -> Plan:
        path = Path(sweep_dir) / PLAN_FILE
        if not path.is_file():
            raise ConfigError("--resume", str(sweep_dir), f"a sweep folder with {PLAN_FILE}")
        return cls(**json.loads(path.read_text()))


def sweep_from_dict(raw: Any) -> SweepConfig:
    return from_dict(SweepConfig, raw, "")


def load_sweep(path: str | Path) -> SweepConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError("(file)", str(path), "an existing sweep file") from None
    except yaml.YAMLError as e:
        raise ConfigError("(file)", str(path), f"valid YAML ({e})") from None
    return sweep_from_dict(raw)


def make_plan(
    sweep_file: str | Path,
    *,
    profile: str | None = None,
    sets: list[str] | tuple[str, ...] = (),
    sweep_dir: str | Path | None = None,
) -> Plan:
    """Load the sweep and its base experiment, and validate every trial it can produce.

    The sweep folder is `sweep_dir`, else `output.dir`/(`output.name` or the sweep's name).
    Raises ConfigError naming the key (and, for a trial's value, the search point) before
    anything starts.
    """
    sweep_file = Path(sweep_file)
    cfg = load_sweep(sweep_file)
    params = parse_search(cfg.search)
    base_path = (sweep_file.parent / cfg.base).resolve()

    raw = resolve_raw(base_path)
    raw = _apply(raw, {**cfg.fixed, **cfg.resources.scaling_overrides()})
    if profile:
        raw = deep_merge(raw, read_profile(base_path, profile))
    for item in sets:
        raw = apply_override(raw, item)
    base = experiment_from_dict(raw)  # the common part is valid on its own

    known = base.to_dict()
    for key in [*cfg.search, *cfg.fixed]:
        check(_has_key(known, key), key, cfg.search.get(key, cfg.fixed.get(key)),
              "a key of the base experiment " + str(base_path.name))  # fmt: skip
    for item in sets:
        check(item.split("=", 1)[0].strip() not in cfg.search, "--set", item,
              "a key the sweep does not search")  # fmt: skip

    if sweep_dir is None:
        sweep_dir = local_folder(cfg.output.dir, "output.dir") / (cfg.output.name or cfg.name)
    plan = Plan(
        sweep=to_dict(cfg),
        sweep_file=str(sweep_file.resolve()),
        profile=profile,
        sets=list(sets),
        base_raw=raw,
        sweep_dir=str(local_folder(sweep_dir, "--out")),
        points=grid_points(params),
    )
    trial_experiments(plan)  # validates every value a trial can get
    return plan


def local_folder(value: str | Path, key: str) -> Path:
    """A sweep folder as an absolute filesystem path (a volume every node mounts, on a
    cluster): a path, made absolute against the working directory, or a `file://` URI.
    Object-store URIs are refused by name: the trials' run directories are written by
    `raydiology run`'s path, which works on files. Never `Path.resolve()`d: a URI would
    turn into a folder named `s3:` under the working directory."""
    text = str(value)
    scheme, sep, rest = text.partition("://")
    if sep:
        check(
            scheme == "file",
            key,
            text,
            "a filesystem path or file:// URI; for object storage mount the bucket on every "
            "node (e.g. at /mnt/runs) and give that path",
        )
        return Path(rest)
    return Path(os.path.abspath(os.path.expanduser(text)))


def validation_points(points: list[dict[str, Any]], params: list[Param]) -> list[dict[str, Any]]:
    """Each grid point with every sampled key at each of its bounds / choices in turn (the
    others at their first value): every value a trial can get is tried at least once."""
    out = []
    sampled = [p for p in params if p.kind not in ("grid", "follows")]
    for point in points:
        active = [p for p in sampled if p.applies(point)]
        first = {p.key: p.values[0] for p in active}
        if not active:
            out.append(dict(point))
        for p, value in itertools.chain.from_iterable(((p, v) for v in p.bounds()) for p in active):
            out.append({**point, **first, p.key: value})
    return out


def trial_experiments(plan: Plan) -> list[Experiment]:
    """The validated experiments of `validation_points` (built once per plan: building
    checks the model on the meta device, which takes a moment for paper-sized models)."""
    cached = plan.__dict__.get("_experiments")
    if cached is not None:
        return cached
    out = []
    for values in validation_points(plan.points, plan.params):
        try:
            out.append(plan.trial_experiment(values, "validate"))
        except ConfigError as e:
            swept = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(e.key, e.value, f"{e.allowed} (sweep point {swept})") from None
    plan.__dict__["_experiments"] = out
    return out


def _apply(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for key, value in values.items():
        out = apply_override(out, f"{key}={json.dumps(value)}")
    return out


def _has_key(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
