"""`raydiology submit | status | logs | stop | list` against a real local Ray head with its
dashboard on 127.0.0.1 and token authentication on: the HD-MAE smoke experiment runs to
SUCCEEDED as a Ray job, a second job is stopped, and requests without the right token are
refused at once. Without Ray: what a submitted sweep's command carries (--out, --resume,
--max-cluster) and the refusal of relative folders."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.cluster.jobs import (
    TERMINAL,
    JobsClient,
    check_shared_dir,
    job_options,
    sweep_job_args,
)
from raydiology.cluster.localhead import LocalHead
from raydiology.cluster.manifests import job_entrypoint
from raydiology.cluster.workload import load_workload
from raydiology.config_base import ConfigError
from raydiology.tune.capacity import format_resources, preset_capacity

REPO = Path(__file__).resolve().parents[1]
SWEEP = "experiments/sweeps/mask_ratio.yaml"


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


def test_submitted_sweep_carries_its_folder_resume_and_maximum_size(monkeypatch):
    """`submit SWEEP --out --resume --cluster` -> the job runs `raydiology sweep` with the same
    --out and --resume and the preset's maximum size as --max-cluster."""
    monkeypatch.chdir(REPO)
    options = job_options(Path(SWEEP), out="/mnt/runs/sweeps", resume="mask_ratio", cluster="a800")
    work = load_workload(Path(SWEEP), root=REPO, profile="smoke", cluster="a800", extra=options)
    command = job_entrypoint(work.args)
    maximum = format_resources(preset_capacity("a800"))
    assert work.kind == "sweep" and command.startswith(f"raydiology sweep {SWEEP}")
    for part in ("--address auto", "--out /mnt/runs/sweeps", "--resume mask_ratio",
                 f"--max-cluster {maximum}"):  # fmt: skip
        assert part in command, command
    assert sweep_job_args(max_cluster="GPU=16", fresh=True) == [
        "--fresh",
        "--max-cluster",
        "GPU=16",
    ]
    assert job_options(Path("experiments/hd_mae_cam.yaml")) == ["--address", "auto"]
    with pytest.raises(ConfigError, match="--resume"):  # a sweep's option on an experiment
        job_options(Path("experiments/hd_mae_cam.yaml"), resume="x")
    # a resubmitted experiment may continue under changed settings the user names
    allowed = job_options(Path("experiments/hd_mae_cam.yaml"), allow_changes="train.max_steps")
    assert allowed[-2:] == ["--allow-changes", "train.max_steps"]
    with pytest.raises(ConfigError, match="--allow-changes"):  # an experiment's on a sweep
        job_options(Path(SWEEP), allow_changes="train.max_steps")


def test_submit_refuses_relative_folders_before_contacting_the_cluster(monkeypatch):
    """A relative output.dir (an experiment's, a sweep file's or --out) would land in the
    job's temporary working dir on the head: refused with a hint at shared storage, before
    any request (the address below does not answer)."""
    monkeypatch.chdir(REPO)
    nowhere = "http://127.0.0.1:9"
    out = cli("submit", "experiments/hd_mae_cam.yaml", "--profile", "smoke",
              "--set", "output.dir=runs", "--address", nowhere, code=2)  # fmt: skip
    text = " ".join(out.split())
    assert "output.dir" in text and "'runs'" in text and "shared storage" in text, text
    assert "temporary working dir on the head" in text and "/mnt/runs" in text, text
    out = cli("submit", SWEEP, "--profile", "smoke", "--address", nowhere, code=2)
    assert "output.dir" in out and "runs/sweeps" in out, out  # the sweep file's own
    out = cli("submit", SWEEP, "--profile", "smoke", "--out", "sweeps", "--address", nowhere,
              code=2)  # fmt: skip
    assert "--out" in out, out
    check_shared_dir("/mnt/runs", "output.dir")
    check_shared_dir("s3://bucket/runs", "output.dir")  # not resolved into a local folder


@pytest.mark.ray
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
