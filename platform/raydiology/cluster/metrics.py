"""The training loop's own Prometheus metrics, through `ray.util.metrics`.

Each node's Ray metrics agent exports them (prefixed `ray_`) beside Ray's own, on the node's
metrics export port, so the Grafana dashboard in kube/grafana/ reads them from the same
Prometheus. Every series carries the tags experiment, run and worker_rank.
"""

from __future__ import annotations

from typing import Any

TAG_KEYS = ("experiment", "run", "worker_rank")
PREFIX = "raydiology_train_"
# seconds a step waited for its batch: from "prefetch keeps up" to "the GPUs starve"
DATA_WAIT_BOUNDARIES = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

GAUGES = {
    "images_per_second": "images/s trained by this worker itself (last report window)",
    "tokens_per_second": "image patch tokens per second on this worker (every patch, masked or not)",
    "loss": "training loss, averaged over every rank (last report window)",
    "learning_rate": "learning rate of the first parameter group",
    "grad_norm": "global gradient 2-norm of the last optimizer step",
    "step": "optimizer steps taken",
    "data_wait_seconds_per_step": "seconds per step spent waiting for the next batch",
    "gpu_memory_allocated_bytes": "peak GPU memory allocated by tensors since the last report",
    "gpu_memory_reserved_bytes": "GPU memory held by the caching allocator",
}
COUNTERS = {"images": "images trained by this worker"}
HISTOGRAMS = {"data_wait_seconds": "seconds each optimizer step waited for its batches"}

METRIC_NAMES = sorted(PREFIX + n for n in [*GAUGES, *COUNTERS, *HISTOGRAMS])


class TrainMetrics:
    """One worker's metrics. Create it inside the worker (metrics are per process)."""

    def __init__(
        self, *, experiment: str, run: str, rank: int, tokens_per_image: int | None = None
    ) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = {"experiment": experiment, "run": run, "worker_rank": str(rank)}
        self.tokens_per_image = tokens_per_image
        self.gauges = {
            name: Gauge(PREFIX + name, description=text, tag_keys=TAG_KEYS).set_default_tags(tags)
            for name, text in GAUGES.items()
        }
        self.images = Counter(
            PREFIX + "images", description=COUNTERS["images"], tag_keys=TAG_KEYS
        ).set_default_tags(tags)
        self.data_wait = Histogram(
            PREFIX + "data_wait_seconds",
            description=HISTOGRAMS["data_wait_seconds"],
            boundaries=DATA_WAIT_BOUNDARIES,
            tag_keys=TAG_KEYS,
        ).set_default_tags(tags)

    @classmethod
    def for_worker(cls, exp: Any, *, rank: int, model: Any) -> TrainMetrics:
        return cls(
            experiment=exp.name,
            run=exp.run_name,
            rank=rank,
            tokens_per_image=tokens_per_image(model, exp.data.resolution),
        )

    def record(
        self,
        metrics: dict[str, Any],
        *,
        images: int,
        seconds: float,
        step_waits: list[float],
        device: Any,
    ) -> None:
        """`metrics` is the loop's report dict (the same on every rank); `images` and
        `seconds` are this worker's own since the last report, `step_waits` its data wait
        per optimizer step in that window (one histogram sample each)."""
        own_rate = images / max(seconds, 1e-9)
        values = {
            "images_per_second": own_rate,
            "loss": metrics.get("loss"),
            "learning_rate": metrics.get("lr"),
            "grad_norm": metrics.get("grad_norm"),
            "step": metrics.get("step"),
            "data_wait_seconds_per_step": sum(step_waits) / len(step_waits) if step_waits else None,
        }
        if self.tokens_per_image:
            values["tokens_per_second"] = own_rate * self.tokens_per_image
        values.update(_gpu_memory(device))
        for name, value in values.items():
            if value is not None:
                self.gauges[name].set(float(value))
        if images:
            self.images.inc(images)
        for wait in step_waits:
            self.data_wait.observe(wait)


def tokens_per_image(model: Any, resolution: int) -> int | None:
    """Patch tokens the encoder sees per image ((R / patch)^2), when it has a patch size."""
    encoder = getattr(model, "encoder", model)
    patch = getattr(encoder, "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[0]
    if not isinstance(patch, int) or patch <= 0:
        return None
    return (resolution // patch) ** 2


def _gpu_memory(device: Any) -> dict[str, float]:
    import torch

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return {}
    out = {
        "gpu_memory_allocated_bytes": float(torch.cuda.max_memory_allocated(device)),
        "gpu_memory_reserved_bytes": float(torch.cuda.memory_reserved(device)),
    }
    torch.cuda.reset_peak_memory_stats(device)
    return out
