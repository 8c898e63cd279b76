"""A trial's training metrics on their way from its Ray Train controller to Ray Tune.

Tune's own `TuneReportCallback` hands each report to the trial through a queue of one item
that the controller fills with a blocking put. While Tune stops a trial nobody empties it, so
the controller blocks inside the callback and never serves the abort that would free its
workers and their placement group. Here the controller puts into an unbounded
`ray.util.queue.Queue` without waiting, and the trial's driver passes the reports on with
`ray.tune.report` while it waits for its run (`raydiology.tune.runner`).
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback


class ReportToTrial(UserCallback):
    """Runs in the Ray Train controller: rank 0's metrics of every report, into `queue`."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        self.queue.put_nowait(dict(metrics[0]))


def drain(queue: Any) -> list[dict[str, Any]]:
    """Every report waiting in `queue`, oldest first."""
    n = queue.qsize()
    return list(queue.get_nowait_batch(n)) if n else []
