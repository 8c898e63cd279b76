"""While a smoke run trains as a Ray job, the node's Prometheus endpoint (the metrics export
port of a real local Ray head) serves the platform's own metrics, tagged with experiment, run
and worker rank."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.cluster.jobs import TERMINAL, JobsClient
from raydiology.cluster.localhead import LocalHead
from raydiology.cluster.metrics import COUNTERS, GAUGES, HISTOGRAMS, PREFIX

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
# label sets such as {experiment="hd_mae_cam",run="metrics-run",worker_rank="1",...}
SAMPLE = re.compile(r"^(?P<name>ray_raydiology_train_\w+?)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")


def scrape(url: str) -> dict[str, list[dict[str, str]]]:
    """metric name -> the label sets of its samples."""
    out: dict[str, list[dict[str, str]]] = {}
    for line in requests.get(url, timeout=10).text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
            out.setdefault(m["name"], []).append(labels)
    return out


def expected_names(seen: set[str]) -> set[str]:
    """Every gauge (GPU memory only on GPUs), the counter and the histogram, however the
    exporter suffixes counters (_total) and histograms (_bucket/_sum/_count)."""
    missing = set()
    for name in GAUGES:
        if not name.startswith("gpu_") and f"ray_{PREFIX}{name}" not in seen:
            missing.add(name)
    for name in [*COUNTERS, *HISTOGRAMS]:
        if not any(s.startswith(f"ray_{PREFIX}{name}") for s in seen):
            missing.add(name)
    return missing


def test_training_metrics_on_the_node_prometheus_endpoint(tmp_path, monkeypatch):
    with LocalHead(num_cpus=2) as head:
        monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
        monkeypatch.chdir(REPO)
        result = CliRunner().invoke(
            app,
            ["submit", "experiments/hd_mae_cam.yaml", "--profile", "smoke",
             "--address", head.dashboard,
             "--set", f"output.dir={tmp_path}", "--set", "output.name=metrics-run",
             "--set", "train.max_steps=200", "--set", "train.checkpoint_every=1000",
             "--set", "train.log_every=1"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        job_id = re.search(r"^job (raydiology-\S+)", result.output, re.M).group(1)  # type: ignore[union-attr]
        client = JobsClient(head.dashboard, token=head.token)

        deadline = time.monotonic() + 480  # generous: CPU tests share a busy machine
        samples: dict[str, list[dict[str, str]]] = {}
        while time.monotonic() < deadline:
            samples = scrape(head.metrics_url)
            step_ranks = {s.get("worker_rank") for s in samples.get(f"ray_{PREFIX}step", [])}
            if not expected_names(set(samples)) and step_ranks >= {"0", "1"}:
                break
            status = client.status(job_id)
            assert status not in TERMINAL, f"job ended {status} first:\n{client.logs(job_id)}"
            time.sleep(2)
        client.stop(job_id)  # seen enough; the run would take minutes more

        assert not expected_names(set(samples)), (sorted(samples), client.logs(job_id)[-3000:])
        for name in [f"ray_{PREFIX}loss", f"ray_{PREFIX}images_per_second", f"ray_{PREFIX}step"]:
            tags = samples[name]
            assert {t["experiment"] for t in tags} == {"hd_mae_cam"}, tags
            assert {t["run"] for t in tags} == {"metrics-run"}, tags
            assert {t["worker_rank"] for t in tags} == {"0", "1"}, tags  # one series per worker
        assert client.wait(job_id, timeout_s=60) == "STOPPED"
