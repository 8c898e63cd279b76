"""Running a sweep on Ray Tune the Ray Train V2 way: a Tuner over a driver function; each
trial's driver builds one TorchTrainer (through `raydiology.train.launch.run_experiment`,
the same path as `raydiology run`) whose run directory is a normal raydiology run directory.

Sweep folder::

    <output.dir>/<sweep run>/
      plan.json, sweep.yaml     what runs (read again by --resume)
      tune/                     Ray Tune's experiment state (Tuner.restore)
      trials/<trial id>/        one raydiology run per trial (+ trial.json, cost.json)
      trials/_corpora/          the phantom corpus, made once before the trials start
      results.md, results.csv, best.yaml, plots/
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from raydiology.config_base import ConfigError, check
from raydiology.tune.spec import (
    TUNE_DIR,
    YARDSTICK_METRICS,
    Param,
    Plan,
    assignment,
    sampled_value,
    trial_experiments,
)

TRIAL_FILE = "trial.json"  # trial id, swept values, final metrics
COST_FILE = "cost.json"  # wall time so far (kept up to date while the trial runs)


# ----------------------------------------------------------------------------- checks


def planned_resources(address: str | None) -> dict[str, float]:
    """What the trials can use: the running Ray's (tests, `--address`), else what the
    embedded Ray will start with (every core, every visible GPU)."""
    import ray

    if ray.is_initialized():
        return {k: float(v) for k, v in ray.cluster_resources().items()}
    if address:
        raise RuntimeError("connect to the cluster before checking its resources")
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_resources(plan: Plan, total: dict[str, float]) -> None:
    """Every trial fits, `parallel` trials fit together, and CPU-only trials leave Ray Data
    a CPU (with every CPU reserved by trainers the read tasks never start; DESIGN.md)."""
    res = plan.config.resources
    need_cpu = need_gpu = 0.0
    any_cpu_only = False
    for exp in trial_experiments(plan):
        s = exp.scaling
        need_cpu = max(need_cpu, s.num_workers * s.cpus_per_worker)
        if s.use_gpu:
            need_gpu = max(need_gpu, s.num_workers * s.gpus_per_worker)
        else:
            any_cpu_only = True
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    data_cpus = 1.0 if any_cpu_only else 0.0
    per_trial_cpu = need_cpu + res.driver_cpus
    check(
        per_trial_cpu + data_cpus <= cpus,
        "scaling.cpus_per_worker",
        per_trial_cpu,
        f"a trial within the cluster's {cpus:g} CPUs"
        + (" with 1 left for Ray Data" if data_cpus else ""),
    )
    check(
        need_gpu <= gpus,
        "scaling.gpus_per_worker",
        need_gpu,
        f"a trial within the cluster's {gpus:g} GPUs",
    )
    check(
        res.parallel * per_trial_cpu + data_cpus <= cpus
        and res.parallel * need_gpu <= max(gpus, 0.0),
        "resources.parallel",
        res.parallel,
        f"at most as many trials as fit at once: {res.parallel} x ({per_trial_cpu:g} CPU, "
        f"{need_gpu:g} GPU) on {cpus:g} CPUs and {gpus:g} GPUs",
    )


def prepare_corpora(plan: Plan, console: Console) -> None:
    """Make each phantom corpus the trials use once, before parallel trials could race."""
    from raydiology.train.launch import resolve_corpus

    seen = set()
    for exp in trial_experiments(plan):
        key = (exp.data.corpus, json.dumps(exp.to_dict()["data"]["phantom"], sort_keys=True))
        if key not in seen:
            seen.add(key)
            resolve_corpus(exp, console=console)


# ----------------------------------------------------------------------------- the trial


def trial_driver(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """One trial, in its Tune actor: build the experiment, run it as a normal run with Tune's
    report callback, then report the final metrics with the trial's cost (and yardstick)."""
    import ray
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydiology.train.launch import read_metrics, resolve_corpus

    p = Plan(**plan)
    trial_id = ray.tune.get_context().get_trial_id()
    values = assignment(config)
    exp = p.trial_experiment(values, trial_id)
    run_dir = Path(exp.output.dir) / exp.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    info_path = run_dir / TRIAL_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.update({"trial_id": trial_id, "values": values, "attempts": info.get("attempts", 0) + 1})
    info_path.write_text(json.dumps(info, indent=2))

    # The run goes through `raydiology run`'s path in a task this actor owns, so stopping the
    # trial (ASHA, a retry) takes its TorchTrainer down with it (see _Reaper).
    fit = ray.remote(_fit).options(num_cpus=0)
    with _WallClock(run_dir / COST_FILE):
        metrics, export = ray.get(fit.remote(exp.to_dict(), TuneReportCallback()))
    final = dict(metrics)
    # A run that validates (report SFT) exports its best checkpoint: rank it by that one's
    # figures (val_score, val_BLEU_4, ...), not by the last validation's.
    summary = run_dir / "summary.json"
    if summary.is_file():
        selected = json.loads(summary.read_text()).get("selected") or {}
        final.update({k: v for k, v in selected.items() if k.startswith("val_")})
    final.update(trial_cost(exp, run_dir))
    cfg = p.config
    if cfg.probe is not None and export is not None:
        corpus = resolve_corpus(exp, console=Console(quiet=True))  # made before the sweep
        final.update(yardstick(Path(export), cfg.probe, corpus, run_dir))
    info["final"] = {k: v for k, v in final.items() if isinstance(v, (int, float, str))}
    info_path.write_text(json.dumps(info, indent=2))
    final.setdefault("step", (read_metrics(run_dir) or [{}])[-1].get("step", 0))
    ray.tune.report({k: v for k, v in final.items() if isinstance(v, (int, float))})


def _fit(exp_dict: dict[str, Any], callback: Any) -> tuple[dict[str, Any], str | None]:
    """`raydiology run` of one trial (a Ray task): its final metrics and encoder export."""
    from raydiology.config import experiment_from_dict
    from raydiology.train.launch import run_experiment

    console = Console(force_terminal=False)
    result = run_experiment(experiment_from_dict(exp_dict), console=console, callbacks=[callback])
    return dict(result.metrics), str(result.export) if result.export else None


class _WallClock:
    """Keeps `cost.json` current (every 2 s) so a killed or early-stopped trial's time counts,
    and adds up the attempts of a resumed or retried trial."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.before = json.loads(path.read_text()).get("wall_s", 0.0) if path.is_file() else 0.0
        self._stop = threading.Event()

    def _write(self) -> None:
        wall = self.before + time.monotonic() - self.started
        self.path.write_text(json.dumps({"wall_s": wall}))

    def _loop(self) -> None:
        while not self._stop.wait(2.0):
            self._write()

    def __enter__(self) -> _WallClock:
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self._write()


def trial_cost(exp, run_dir: Path) -> dict[str, float]:
    """Measured throughput (median over the run's reports; the first is warm-up), wall time
    and device-hours = wall time x the trial's reserved GPUs (or CPUs on CPU workers)."""
    from raydiology.train.launch import read_metrics

    rows = [r for r in read_metrics(run_dir) if "images_per_s" in r]
    speeds = sorted(r["images_per_s"] for r in (rows[1:] or rows))
    wall = (
        json.loads((run_dir / COST_FILE).read_text())["wall_s"]
        if (run_dir / COST_FILE).is_file()
        else 0.0
    )
    s = exp.scaling
    out = {
        "images_per_s": speeds[len(speeds) // 2] if speeds else 0.0,
        "wall_s": wall,
        "cpu_hours": wall / 3600 * s.num_workers * s.cpus_per_worker,
        "gpu_hours": wall / 3600 * s.num_workers * s.gpus_per_worker if s.use_gpu else 0.0,
    }
    return out


def yardstick(export: Path, probe, corpus: str, run_dir: Path) -> dict[str, float | None]:
    """The frozen-encoder yardstick of `raydiology evaluate probe` / `retrieval` on the
    trial's export, on the probe corpus or else the trial's own corpus, from one set of
    features: probe_auroc (mean test AUROC of an MLP probe) and retrieval_precision (mean
    Precision@k of test queries against the train gallery). Details go to probe.json and
    retrieval.json in the trial's run directory."""
    from raydiology.data.corpus import read_manifest
    from raydiology.evaluation.features import load_features, resolve_labels
    from raydiology.evaluation.probe import ProbeConfig, fraction_name, probe_features
    from raydiology.evaluation.retrieval import retrieve_features

    corpus = probe.corpus or corpus
    columns = resolve_labels(list(probe.labels), read_manifest(corpus).label_columns)
    fs = load_features(
        export, corpus, pooling=probe.pool, cache_dir=run_dir / "probe_features",
        batch_size=probe.batch_size, device="cpu", progress=False,
    )  # fmt: skip
    pcfg = ProbeConfig(fractions=(probe.fraction,), seeds=probe.seeds, max_epochs=probe.max_epochs)
    probed = probe_features(fs, columns, pcfg)
    (run_dir / "probe.json").write_text(json.dumps(probed, indent=2, default=str))
    retrieved = retrieve_features(fs, columns, ks=(probe.retrieval_k,))
    (run_dir / "retrieval.json").write_text(json.dumps(retrieved, indent=2, default=str))
    return {
        "probe_auroc": probed["fractions"][fraction_name(probe.fraction)]["auroc_mean"]["mean"],
        "retrieval_precision": retrieved["precision"][str(probe.retrieval_k)],
    }


# ----------------------------------------------------------------------------- the sweep


class _Reaper:
    """Frees the workers' placement group of a trial Tune has stopped.

    A stopped trial's TorchTrainer controller dies with its driver, but the placement group
    it made lives as long as the job (the sweep), keeping its CPUs/GPUs reserved, so the next
    trial's data pipeline never starts. Ray Train's own PlacementGroupCleaner asks the state
    API, which fails on a machine running several Ray instances or without a dashboard.
    This asks the GCS directly: a placement group whose creator was a TrainController that
    is now dead is removed.
    """

    def __init__(self, period_s: float = 2.0) -> None:
        self.period_s = period_s
        self._stop = threading.Event()

    def __enter__(self) -> _Reaper:
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(Exception):  # best effort; Ray's cleaner may still do it
                self.reap()

    @staticmethod
    def reap() -> int:
        import ray
        from ray._private.state import actors, state  # no public API names the creator
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        removed = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)  # type: ignore[attr-defined]
            created = gcs_pb2.PlacementGroupTableData.CREATED  # type: ignore[attr-defined]
            if pg.state != created or pg.is_detached:
                continue
            creator = pg.creator_actor_id.hex()
            if not pg.creator_actor_dead or not creator or set(creator) == {"f"}:
                continue  # alive, or made by a driver (e.g. Tune's own trial groups)
            info = actors(creator)
            if info.get("ActorClassName", "").endswith("TrainController"):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
        return removed


class _Draw:
    """A sampled key for `tune.sample_from`: drawn when its `when` holds for the trial's grid
    point, else NOT_SET. A class (not a lambda) so Tune can save it for --resume."""

    def __init__(self, param: Param, seed: int | None) -> None:
        self.param = param
        self.rng = random.Random(seed)

    def __call__(self, spec) -> Any:
        return sampled_value(self.param, dict(spec.config.get("grid") or {}), self.rng)


def param_space(plan: Plan) -> dict[str, Any]:
    from ray import tune

    cfg = plan.config
    space: dict[str, Any] = {}
    if plan.points != [{}]:
        space["grid"] = tune.grid_search(plan.points)
    sampled = [p for p in plan.params if p.kind not in ("grid", "follows")]
    if sampled:
        space["sampled"] = {
            p.key: tune.sample_from(_Draw(p, None if cfg.seed is None else cfg.seed + i))
            for i, p in enumerate(sampled)
        }
    return space


def _scheduler(plan: Plan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = plan.config
    s = cfg.scheduler
    if s.name == "none":
        return FIFOScheduler()
    # The yardstick runs after training, so ASHA compares the training loss mid-run.
    metric = s.metric or (cfg.metric if cfg.metric not in YARDSTICK_METRICS else "loss")
    mode = s.mode or (cfg.mode if metric == cfg.metric else "min")
    # One past the last step: ASHA stops a trial that reaches max_t, which would cut its
    # driver off before the run's summary and the final report.
    max_t = (s.max_t or max(e.train.max_steps for e in trial_experiments(plan))) + 1
    return ASHAScheduler(
        time_attr=s.time_attr,
        metric=metric,
        mode=mode,
        max_t=max_t,
        grace_period=s.grace_steps(max_t),
        reduction_factor=s.reduction_factor,
    )


def _trainable(plan: Plan):
    from ray import tune

    driver = tune.with_parameters(trial_driver, plan=plan.to_dict())
    cpus = plan.config.resources.driver_cpus
    # Tune refuses an empty request; a nominal MiB of Ray's logical memory stands in for a
    # driver that holds no CPU (on a small machine its CPU would starve Ray Data).
    return tune.with_resources(driver, {"cpu": cpus} if cpus else {"cpu": 0, "memory": 2**20})


def run_sweep(
    plan: Plan,
    *,
    address: str | None = None,
    resume: bool = False,
    console: Console | None = None,
):
    """Validate resources, start or join Ray, run (or restore) the Tuner, write the results.

    Returns the results rows (see `raydiology.tune.results`)."""
    from ray import tune

    from raydiology.train.launch import connect_ray
    from raydiology.tune.results import write_results

    console = console or Console()
    # A sweep sent as a Ray job has its cluster in RAY_ADDRESS: check against that cluster,
    # not against the head's own cores.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        check_resources(plan, planned_resources(None))
    sweep_dir = Path(plan.sweep_dir)
    tune_path = sweep_dir / TUNE_DIR
    if not resume and tune_path.exists():
        raise ConfigError(
            "output.name", sweep_dir.name, f"a new sweep folder ({sweep_dir} exists; --resume it)"
        )
    plan.save()
    prepare_corpora(plan, console)
    connect_ray(address, dashboard_host="127.0.0.1", console=console)
    if address:
        check_resources(plan, planned_resources(address))

    # Save Tune's state every few seconds, so a driver killed right after a trial finished
    # does not forget it (Tune's default waits 10 s or more).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    cfg = plan.config
    if resume:
        console.print(f"[bold]resume sweep[/] {sweep_dir.name}  ({tune_path})")
        tuner = tune.Tuner.restore(
            str(tune_path), trainable=_trainable(plan), resume_unfinished=True, resume_errored=True
        )
    else:
        console.print(f"[bold]sweep[/] {cfg.name}  ->  {sweep_dir}")
        tuner = tune.Tuner(
            _trainable(plan),
            param_space=param_space(plan),
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(plan),
                num_samples=cfg.num_samples,
                max_concurrent_trials=cfg.resources.parallel,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=str(sweep_dir),
                failure_config=tune.FailureConfig(max_failures=cfg.max_retries),
                verbose=1,
            ),
        )
    with _Reaper():
        grid = tuner.fit()
    return write_results(plan, grid, console=console)


def find_sweep(resume: str, plan_dir_default: Path) -> Path:
    """`--resume RUN`: a sweep folder, or a sweep run name under the sweep's output.dir."""
    path = Path(resume).expanduser()
    if (path / "plan.json").is_file():
        return path.resolve()
    return (plan_dir_default / resume).resolve()
