"""`raydiology submit | status | logs | stop | list` against a real local Ray head with its
dashboard on 127.0.0.1 and token authentication on: the HD-MAE smoke experiment runs to
SUCCEEDED as a Ray job, a second job is stopped, and requests without the right token are
refused at once."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.cluster.jobs import TERMINAL, JobsClient
from raydiology.cluster.localhead import LocalHead

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def submit(address: str, runs: Path, *sets: str) -> str:
    args = ["submit", "experiments/hd_mae_cam.yaml", "--profile", "smoke", "--address", address]
    for item in (f"output.dir={runs}", *sets):
        args += ["--set", item]
    out = cli(*args)
    job_id = re.search(r"^job (raydiology-\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    assert f"{address}/#/jobs/{job_id}" in out  # the dashboard link
    assert f"raydiology logs {job_id}" in out  # how to follow
    return job_id


def test_submit_status_logs_stop_list(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.chdir(REPO)  # the working dir that gets uploaded
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    home = str(Path.home())
    with LocalHead(num_cpus=2) as head:
        address = head.dashboard

        # No token: the Jobs API itself refuses, and the CLI says so before sending anything.
        assert requests.get(f"{address}/api/jobs/", timeout=10).status_code == 401
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
        assert "no Ray auth token" in cli("list", "--address", address, code=3)
        # A wrong token: one request, a clear error, no retry loop.
        monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
        started = time.monotonic()
        assert "refused the token from RAY_AUTH_TOKEN" in cli("list", "--address", address, code=3)
        assert time.monotonic() - started < 15

        monkeypatch.setenv("HOME", home)
        monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
        first = submit(
            address, runs, "train.max_steps=4", "train.checkpoint_every=4", "train.log_every=2"
        )
        second = submit(address, runs, "output.name=second", "train.max_steps=1000")
        client = JobsClient(address)
        assert client.wait(second, timeout_s=180, statuses=("RUNNING", *TERMINAL)) == "RUNNING"
        assert "stopping" in cli("stop", second, "--address", address)
        assert client.wait(second, timeout_s=120) == "STOPPED"

        assert client.wait(first, timeout_s=900) == "SUCCEEDED", client.logs(first)[-4000:]
        assert cli("status", first, "--address", address).startswith("SUCCEEDED")
        logs = cli("logs", first, "--address", address)
        assert "done step 4" in logs and "encoder export" in logs
        # --follow streams the same log and returns once the job has ended
        assert "done step 4" in cli("logs", first, "--address", address, "--follow")
        listed = cli("list", "--address", address)
        assert re.search(rf"{first}\s+SUCCEEDED\s+hd_mae_cam\s+hd_mae_cam", listed), listed
        assert re.search(rf"{second}\s+STOPPED\s+hd_mae_cam\s+second", listed), listed

    summary = json.loads((runs / "hd_mae_cam" / "summary.json").read_text())
    assert summary["metrics"]["step"] == 4 and summary["export"]
