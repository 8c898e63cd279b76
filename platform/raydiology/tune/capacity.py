"""A sweep's demand against its cluster's size: as it is now, and as big as it can grow.

The KubeRay presets start their worker groups at `min_replicas: 0`, so a fresh cluster has no
GPUs until the autoscaler sees demand. A sweep is therefore checked against the cluster's
maximum size (a preset's worker groups at `max_replicas`, or `--max-cluster GPU=16,CPU=128`)
and refused only when it cannot fit that; when it fits the maximum but not the cluster as it
is now, a warning names what the autoscaler still has to add. The embedded local Ray cannot
grow: there the size now is the maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from raydiology.config_base import ConfigError, check
from raydiology.tune.spec import Plan, trial_experiments

MAX_CLUSTER_HINT = "NAME=NUMBER[,NAME=NUMBER...], e.g. GPU=16,CPU=128"


@dataclass(frozen=True, kw_only=True)
class Demand:
    """What the sweep holds at once: `parallel` trials of the largest trial it can produce."""

    trial_cpus: float  # Ray Train workers + the trial's driver
    trial_gpus: float
    data_cpus: float  # 1 left for Ray Data where trials train on CPU workers
    parallel: int

    def total(self) -> dict[str, float]:
        return {
            "CPU": self.parallel * self.trial_cpus + self.data_cpus,
            "GPU": self.parallel * self.trial_gpus,
        }


def demand(plan: Plan) -> Demand:
    res = plan.config.resources
    cpus = gpus = 0.0
    cpu_only = False
    for exp in trial_experiments(plan):
        s = exp.scaling
        cpus = max(cpus, s.num_workers * s.cpus_per_worker)
        if s.use_gpu:
            gpus = max(gpus, s.num_workers * s.gpus_per_worker)
        else:
            cpu_only = True
    return Demand(
        trial_cpus=cpus + res.driver_cpus,
        trial_gpus=gpus,
        data_cpus=1.0 if cpu_only else 0.0,
        parallel=res.parallel,
    )


def check_resources(plan: Plan, total: dict[str, float], *, size: str = "") -> None:
    """Every trial fits `total`, `parallel` trials fit together, and CPU-only trials leave Ray
    Data a CPU (with every CPU reserved by trainers the read tasks never start; DESIGN.md).
    `size` words the total in the message (e.g. " maximum")."""
    d = demand(plan)
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    where = f"the cluster's{size}"
    check(
        d.trial_cpus + d.data_cpus <= cpus,
        "scaling.cpus_per_worker",
        d.trial_cpus,
        f"a trial within {where} {cpus:g} CPUs"
        + (" with 1 left for Ray Data" if d.data_cpus else ""),
    )
    check(
        d.trial_gpus <= gpus,
        "scaling.gpus_per_worker",
        d.trial_gpus,
        f"a trial within {where} {gpus:g} GPUs",
    )
    need = d.total()
    check(
        need["CPU"] <= cpus and need["GPU"] <= gpus,
        "resources.parallel",
        d.parallel,
        f"at most as many trials as fit at once: {d.parallel} x ({d.trial_cpus:g} CPU, "
        f"{d.trial_gpus:g} GPU) on {where} {cpus:g} CPUs and {gpus:g} GPUs",
    )


def shortfall(plan: Plan, total: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Resources the sweep needs more of than `total` has: name -> (needed, there)."""
    need = demand(plan).total()
    return {k: (v, total.get(k, 0.0)) for k, v in need.items() if v > total.get(k, 0.0)}


def check_cluster(
    plan: Plan,
    now: dict[str, float],
    maximum: dict[str, float] | None,
    *,
    console: Console,
) -> None:
    """Refuse a sweep that cannot fit the cluster's `maximum` (without one: the cluster as it
    is now); warn, naming the resources, when it fits the maximum but not the cluster now."""
    if maximum is None:
        try:
            check_resources(plan, now)
        except ConfigError as e:
            raise ConfigError(
                e.key,
                e.value,
                f"{e.allowed} (the cluster as it is now; if it autoscales, give its maximum "
                "size: --cluster a800|a100 or --max-cluster GPU=16,CPU=128)",
            ) from None
        return
    largest = {k: max(now.get(k, 0.0), maximum.get(k, 0.0)) for k in {*now, *maximum}}
    check_resources(plan, largest, size=" maximum")
    missing = shortfall(plan, now)
    if missing:
        needs = ", ".join(f"{n:g} {k} (has {h:g})" for k, (n, h) in sorted(missing.items()))
        console.print(
            f"[yellow]warning[/]: the cluster is smaller now than the sweep needs: {needs}; "
            f"its trials wait for the autoscaler to add nodes (at most {format_resources(largest)})"
        )


def parse_resources(text: str, key: str = "--max-cluster") -> dict[str, float]:
    """`GPU=16,CPU=128` -> {"GPU": 16.0, "CPU": 128.0} (cpu/gpu in any case)."""
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        check(bool(sep and name) and number >= 0, key, text, MAX_CLUSTER_HINT)
        out[name.upper() if name.lower() in ("cpu", "gpu") else name] = number
    return out


def format_resources(resources: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in sorted(resources.items()))


def preset_capacity(name: str) -> dict[str, float]:
    """A preset's cluster at its largest: each worker group at max_replicas x its pods'
    CPUs/GPUs. The head takes no tasks (its Ray starts with num-cpus 0), so it adds nothing."""
    from raydiology.cluster.presets import load_preset

    preset = load_preset(name)
    gpu, cpu = preset.gpu_nodes, preset.cpu_nodes
    return {
        "CPU": float(gpu.cpus * gpu.max_replicas + cpu.cpus * cpu.max_replicas),
        "GPU": float(gpu.gpus * gpu.max_replicas + cpu.gpus * cpu.max_replicas),
    }


def cluster_maximum(cluster: str | None, max_cluster: str | None) -> dict[str, float] | None:
    """The maximum size from `--cluster NAME` and/or `--max-cluster` (its keys win); None
    when neither is given."""
    if not cluster and not max_cluster:
        return None
    out = preset_capacity(cluster) if cluster else {}
    out.update(parse_resources(max_cluster) if max_cluster else {})
    return out


# A sweep runs several trials: the cluster preset sets where each trial runs (accelerator,
# per-worker GPUs/CPUs), while the sweep's own `resources` keep deciding the workers per trial.
SWEEP_SCALING_KEYS = ("accelerator_type", "use_gpu", "gpus_per_worker", "cpus_per_worker")


def preset_sweep_sets(cluster: str) -> list[str]:
    """A preset's scaling as `--set` items on the sweep's base experiment: where each trial
    runs (accelerator, per-worker GPUs/CPUs); the sweep's own `resources` keep deciding the
    workers per trial (as `raydiology submit --cluster` does for a sweep)."""
    from raydiology.cluster.presets import load_preset

    items = load_preset(cluster).scaling_overrides()
    return [i for i in items if i.split("=", 1)[0].removeprefix("scaling.") in SWEEP_SCALING_KEYS]
