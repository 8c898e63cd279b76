"""While a smoke run trains as a Ray job, the node's Prometheus endpoint (the metrics export
port of a real local Ray head) serves the platform's own metrics, tagged with experiment, run
and worker rank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
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
PROMETHEUS = shutil.which("prometheus")
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


PER_WORKER = ("loss", "images_per_second", "step", "data_wait_seconds_per_step")


class Prometheus:
    """A real Prometheus server scraping one Ray node every second (Debian's `prometheus`)."""

    def __init__(self, target: str, folder: Path) -> None:
        from raydiology.cluster.localhead import free_port

        self.port = free_port()
        config = folder / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: ray, static_configs: [{{targets: ['{target}']}}]}}]\n"
        )
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=(folder / "prometheus.log").open("w"),
        )  # fmt: skip

    def query(self, promql: str) -> list[dict]:
        """The instant vector's series: [{"metric": {labels}, "value": [t, "v"]}, ...]."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query"
        try:
            answer = requests.get(url, params={"query": promql}, timeout=5).json()
        except (requests.RequestException, ValueError):
            return []  # not listening yet
        return answer.get("data", {}).get("result", [])

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def per_worker_answers(prometheus: Prometheus) -> dict[str, dict[str, float]]:
    """For each per-worker gauge: worker_rank -> value, from a PromQL query."""
    answers = {}
    for name in PER_WORKER:
        series = prometheus.query(f'ray_{PREFIX}{name}{{run="metrics-run"}}')
        answers[name] = {s["metric"].get("worker_rank"): float(s["value"][1]) for s in series}
    return answers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run submitted to a local Ray head with a metrics export port, watched until
    every custom metric is served for both workers (and, where Prometheus is installed, a
    Prometheus server scraping that node answers PromQL for both workers)."""
    tmp_path = tmp_path_factory.mktemp("metrics")
    with LocalHead(num_cpus=2) as head, pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
        monkeypatch.chdir(REPO)
        prometheus = Prometheus(head.metrics_url.split("/")[2], tmp_path) if PROMETHEUS else None
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
        try:
            deadline = time.monotonic() + 480  # generous: CPU tests share a busy machine
            samples: dict[str, list[dict[str, str]]] = {}
            answers: dict[str, dict[str, float]] = {}
            while time.monotonic() < deadline:
                samples = scrape(head.metrics_url)
                step_ranks = {s.get("worker_rank") for s in samples.get(f"ray_{PREFIX}step", [])}
                served = not expected_names(set(samples)) and step_ranks >= {"0", "1"}
                if served and prometheus is not None:
                    answers = per_worker_answers(prometheus)
                    served = all(set(a) >= {"0", "1"} for a in answers.values())
                if served:
                    break
                status = client.status(job_id)
                assert status not in TERMINAL, f"job ended {status} first:\n{client.logs(job_id)}"
                time.sleep(2)
            client.stop(job_id)  # seen enough; the run would take minutes more
            yield {"samples": samples, "answers": answers, "logs": client.logs(job_id)[-3000:]}
            assert client.wait(job_id, timeout_s=60) == "STOPPED"
        finally:
            if prometheus is not None:
                prometheus.close()


def test_training_metrics_on_the_node_prometheus_endpoint(trained):
    samples = trained["samples"]
    assert not expected_names(set(samples)), (sorted(samples), trained["logs"])
    for name in [f"ray_{PREFIX}loss", f"ray_{PREFIX}images_per_second", f"ray_{PREFIX}step"]:
        tags = samples[name]
        assert {t["experiment"] for t in tags} == {"hd_mae_cam"}, tags
        assert {t["run"] for t in tags} == {"metrics-run"}, tags
        assert {t["worker_rank"] for t in tags} == {"0", "1"}, tags  # one series per worker


def test_a_real_prometheus_answers_promql_for_each_worker(trained):
    if not PROMETHEUS:
        pytest.skip("no `prometheus` binary (Debian's prometheus package; .ci/run installs it)")
    answers = trained["answers"]
    print(json.dumps(answers, indent=2))  # the figures quoted in notes: pytest -s
    for name in PER_WORKER:
        assert set(answers[name]) >= {"0", "1"}, (name, answers)
    # each worker reports its own rate, not the job's divided by the worker count
    assert all(rate > 0 for rate in answers["images_per_second"].values()), answers
