"""Running a sweep on Ray Tune the Ray Train V2 way: a Tuner over a driver function; each
trial's driver builds one TorchTrainer (through `raydiology.train.launch.run_experiment`,
the same path as `raydiology run`) whose run directory is a normal raydiology run directory.

Sweep folder (one per sweep: running the sweep again resumes it)::

    <output.dir>/<output.name or sweep name>/
      plan.json, sweep.yaml     what runs (a rerun or --resume reads it again)
      tune/                     Ray Tune's experiment state (Tuner.restore)
      trials/<trial id>/        one raydiology run per trial (+ trial.json, cost.json)
      trials/_corpora/          the phantom corpus, made once before the trials start
      probe_corpora/            the yardstick's bounded sample of a large corpus
      results.md, results.csv, best.yaml, plots/
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from raydiology.config_base import check
from raydiology.tune.capacity import check_cluster, check_resources
from raydiology.tune.spec import (
    PLAN_FILE,
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


def prepare_corpora(plan: Plan, console: Console) -> None:
    """Make each phantom corpus the trials use once, before parallel trials could race."""
    from raydiology.train.launch import resolve_corpus

    seen = set()
    for exp in trial_experiments(plan):
        key = (exp.data.corpus, json.dumps(exp.to_dict()["data"]["phantom"], sort_keys=True))
        if key not in seen:
            seen.add(key)
            resolve_corpus(exp, console=console)


def probe_sources(plan: Plan) -> list[str]:
    """The corpora the trials' yardstick samples: the probe's, else each trial's own."""
    from raydiology.train.launch import resolve_corpus

    probe = plan.config.probe
    if probe is None:
        return []
    if probe.corpus:
        return [probe.corpus]
    quiet = Console(quiet=True)
    return sorted({resolve_corpus(exp, console=quiet) for exp in trial_experiments(plan)})


def prepare_probe_corpora(plan: Plan, console: Console) -> None:
    """Sample each large probe corpus down to `probe.max_images` once, before the trials, in
    a Ray task holding a CPU (on a cluster: on a worker, not the head)."""
    import ray

    from raydiology.tune.yardstick import bounded_corpus, probe_corpus

    probe = plan.config.probe
    if probe is None or probe.max_images is None:
        return
    todo = {s: probe_corpus(plan, s) for s in probe_sources(plan)}
    todo = {s: d for s, d in todo.items() if d != s and not (Path(d) / "manifest.json").is_file()}
    if not todo:
        return
    make = ray.remote(bounded_corpus).options(num_cpus=1, scheduling_strategy="DEFAULT")
    ray.get([make.remote(s, d, probe.max_images) for s, d in todo.items()])
    for source, made in todo.items():
        console.print(f"probe corpus: {probe.max_images} images of {source}  ->  {made}")


# ----------------------------------------------------------------------------- the trial


def trial_driver(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """One trial, in its Tune actor: build the experiment, run it as a normal run with Tune's
    report callback, then report the final metrics with the trial's cost (and yardstick)."""
    import ray
    import ray.tune
    from ray.util.queue import Queue

    from raydiology.train.launch import read_metrics, resolve_corpus
    from raydiology.tune.reporting import ReportToTrial, drain
    from raydiology.tune.yardstick import probe_corpus, score, score_options

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

    # The run goes through `raydiology run`'s path in a task this trial owns and ends when
    # Tune stops the trial (_EndsItsTasks). One run per worker process: Ray Train's Ctrl-C
    # handler, which that ending relies on, must not outlive it in a reused worker. Its
    # reports come back through `reports` and go on to Tune from here (tune.reporting).
    fit = ray.remote(num_cpus=0, max_calls=1)(_fit)
    reports = Queue(actor_options={"num_cpus": 0})

    def forward() -> None:
        for item in drain(reports):
            ray.tune.report(item)

    cfg = p.config
    try:
        with _WallClock(run_dir / COST_FILE):
            ref = fit.remote(exp.to_dict(), ReportToTrial(reports))
            metrics, export = _TASKS.wait(ref, every_second=forward)
        final = dict(metrics)
        # A run that validates (report SFT) exports its best checkpoint: rank it by that
        # one's figures (val_score, val_BLEU_4, ...), not by the last validation's.
        summary = run_dir / "summary.json"
        if summary.is_file():
            selected = json.loads(summary.read_text()).get("selected") or {}
            final.update({k: v for k, v in selected.items() if k.startswith("val_")})
        final.update(trial_cost(exp, run_dir))
        if cfg.probe is not None and export is not None:
            source = cfg.probe.corpus or resolve_corpus(exp, console=Console(quiet=True))
            task = ray.remote(score).options(**score_options(exp.scaling))
            corpus = probe_corpus(p, source)  # sampled before the trials started
            args = (export, cfg.probe, corpus, str(run_dir), exp.scaling.use_gpu)
            final.update(_TASKS.wait(task.remote(*args)))
    except _TrialStopped:
        return  # Tune stopped the trial; its time is in cost.json
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


class _TrialStopped(Exception):
    """Tune stopped the trial while its driver waited on a task."""


class _TrialTasks:
    """The Ray task a trial's driver waits on (its run, then its yardstick), so that stopping
    the trial ends it first.

    Ending the run: `ray.cancel` interrupts the task's main thread the way Ctrl-C would, and
    Ray Train answers Ctrl-C by aborting the run, which shuts its workers down and removes
    their placement group. Left to die with the trial's actor instead, the run's controller
    would go down uncleanly and its placement group would stay reserved until the sweep ends
    (Ray Train's own cleaner for that case needs the dashboard's State API), holding the
    CPUs/GPUs the next trial needs. A trial owns its actor process (Tune does not reuse
    actors here), so one instance per process serves.
    """

    def __init__(self, stop_timeout_s: float = 60.0) -> None:
        self.stop_timeout_s = stop_timeout_s
        self._lock = threading.Lock()
        self._running: Any = None
        self._stopping = False

    def wait(self, ref: Any, every_second: Any = None) -> Any:
        """`ray.get(ref)` (calling `every_second()` while it runs and once after), or
        _TrialStopped once the trial is being stopped. Leaving early for any other reason
        (Tune ending the driver's thread inside `tune.report`) ends the task too."""
        import ray

        with self._lock:
            if self._stopping:
                self._end(ref)
                raise _TrialStopped
            self._running = ref
        done = False
        try:
            while not done:
                done = bool(ray.wait([ref], timeout=1.0)[0])
                if every_second is not None:
                    every_second()
            return ray.get(ref)
        except Exception:
            if self._stopping:
                raise _TrialStopped from None
            raise
        except BaseException:  # SystemExit from tune.report of a stopped trial
            if not done:
                self._end(ref)
            raise
        finally:
            with self._lock:
                self._running = None

    def stop(self) -> None:
        """End the running task (see the class)."""
        with self._lock:
            self._stopping = True
            ref = self._running
        if ref is not None:
            self._end(ref)

    def _end(self, ref: Any) -> None:
        """Interrupt the task's own thread (not its children: Ray Train aborts them) and wait
        for it; kill it if it hangs (its workers' placement group then stays reserved until
        the sweep ends)."""
        import ray

        ray.cancel(ref, recursive=False)
        if not ray.wait([ref], timeout=self.stop_timeout_s)[0]:
            ray.cancel(ref, force=True)


_TASKS = _TrialTasks()


class _EndsItsTasks:
    """Mixed into the trial's Tune trainable (through `__mixins__`, which Tune's function
    wrapper inherits from): Tune calls `Trainable.cleanup` when it stops a trial (ASHA, the
    end or interruption of the sweep), before the actor goes."""

    def cleanup(self) -> None:
        _TASKS.stop()
        super().cleanup()  # type: ignore[misc]


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


# ----------------------------------------------------------------------------- the sweep


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
    driver.__mixins__ = (_EndsItsTasks,)  # type: ignore[attr-defined]
    cpus = plan.config.resources.driver_cpus
    # Tune refuses an empty request; a nominal MiB of Ray's logical memory stands in for a
    # driver that holds no CPU (on a small machine its CPU would starve Ray Data).
    return tune.with_resources(driver, {"cpu": cpus} if cpus else {"cpu": 0, "memory": 2**20})


def sweep_mode(plan: Plan, *, resume: bool, fresh: bool, console: Console) -> bool:
    """Whether this run resumes the sweep in `plan.sweep_dir` (True) or starts it (False).

    A sweep folder holding Ray Tune's state is resumed (the same sweep run again: a RayJob's
    retry, a rerun after the driver died); `resume` insists on that state, `fresh` on a
    folder that does not exist yet. A folder holding another sweep (its file, profile or
    --set changed) is refused rather than mixed into."""
    from ray import tune

    sweep_dir = Path(plan.sweep_dir)
    tune_path = sweep_dir / TUNE_DIR
    check(not (resume and fresh), "--fresh", True, "not together with --resume")
    if fresh:
        check(
            not sweep_dir.exists(),
            "--fresh",
            str(sweep_dir),
            "a sweep folder that does not exist yet; it holds an earlier run of this sweep: "
            "run without --fresh to resume it, or start over elsewhere with --out DIR (or "
            "output.name in the sweep file), or delete the folder",
        )
        return False
    restorable = tune.Tuner.can_restore(str(tune_path))
    if resume:
        check(restorable, "--resume", str(sweep_dir),
              f"a sweep folder with Ray Tune's state ({tune_path} has none)")  # fmt: skip
        return True
    if not restorable:
        if tune_path.exists():
            console.print(f"{sweep_dir}: no Tune state was saved; the sweep starts over there")
        return False
    saved = Plan.load(sweep_dir) if (sweep_dir / PLAN_FILE).is_file() else None
    changed = plan.differences(saved) if saved is not None else []
    check(
        not changed,
        "output.name",
        str(sweep_dir),
        f"the folder of this sweep, but it holds a sweep that differs in {', '.join(changed)}: "
        f"resume that one as it was with --resume {sweep_dir}, or start this one elsewhere "
        "with --out DIR (or output.name in the sweep file)",
    )
    console.print(
        f"[bold]resuming[/] the sweep in {sweep_dir} (Ray Tune's state found; "
        "--fresh refuses instead of resuming)"
    )
    return True


def run_sweep(
    plan: Plan,
    *,
    address: str | None = None,
    resume: bool = False,
    fresh: bool = False,
    maximum: dict[str, float] | None = None,
    console: Console | None = None,
):
    """Check resources, start or join Ray, start the Tuner or restore it (see `sweep_mode`),
    write the results. `maximum`: the cluster's size when fully grown (autoscaling), against
    which a sweep on a cluster is checked (`raydiology.tune.capacity`).

    Returns the results rows (see `raydiology.tune.results`)."""
    from ray import tune

    from raydiology.train.launch import connect_ray
    from raydiology.tune.results import write_results

    console = console or Console()
    # A sweep sent as a Ray job has its cluster in RAY_ADDRESS: check against that cluster,
    # not against the head's own cores.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        if maximum is not None:
            console.print("[yellow]warning[/]: the local Ray cannot grow; --cluster/--max-cluster"
                          " size a cluster given by --address or RAY_ADDRESS")  # fmt: skip
        check_resources(plan, planned_resources(None))
    resume = sweep_mode(plan, resume=resume, fresh=fresh, console=console)
    connect_ray(address, dashboard_host="127.0.0.1", console=console)
    if address:
        check_cluster(plan, planned_resources(address), maximum, console=console)
    plan.save()
    prepare_corpora(plan, console)
    prepare_probe_corpora(plan, console)

    # Save Tune's state every few seconds, so a driver killed right after a trial finished
    # does not forget it (Tune's default waits 10 s or more).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    cfg = plan.config
    sweep_dir = Path(plan.sweep_dir)
    tune_path = sweep_dir / TUNE_DIR
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
    grid = tuner.fit()
    return write_results(plan, grid, console=console)


def find_sweep(resume: str, folder: Path) -> Path:
    """`--resume RUN`: a sweep folder, or a sweep's name under `folder` (--out/output.dir)."""
    from raydiology.tune.spec import local_folder

    path = local_folder(resume, "--resume")
    if (path / PLAN_FILE).is_file():
        return path
    return folder / resume
