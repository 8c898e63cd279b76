"""Ray's own clients against a Ray head started as a user starts one (`ray start --head`, token
authentication on, the token from `ray get-auth-token --generate` in ~/.ray): `ray job submit`
runs `raydiology run` to SUCCEEDED, `raydiology status` reads that job, and a driver that finds
`RAY_ADDRESS` set joins that cluster instead of starting its own Ray.

Everything runs in subprocesses with a temporary HOME, so the token and ~/.ray are the test's
own and the test session's Ray (tests/conftest.py) is neither used nor disturbed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from raydiology.cluster.localhead import _stop_processes_under, free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # `ray`, `raydiology` and `python` of this venv
MULTIPLE = "Found multiple active Ray instances"


@dataclass(frozen=True)
class Head:
    env: dict[str, str]  # the user's shell: HOME with ~/.ray/auth_token, RAY_AUTH_MODE=token
    gcs: str  # host:port, what a job's driver finds in RAY_ADDRESS
    dashboard: str  # the Jobs API


def run(*command: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    home = tmp_path_factory.mktemp("home")
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    }
    # TORCH_EXTENSIONS_DIR stays (conftest points it at the shared cache of DeepSpeed's op).
    env.update(HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    made = run(str(BIN / "ray"), "get-auth-token", "--generate", env=env, timeout=60)
    assert made.returncode == 0, made.stderr
    token = (home / ".ray" / "auth_token").read_text().strip()

    # Own temp dirs (short: Ray's sockets live there) and ports: a plain `ray start` records
    # its address in /tmp/ray, where every later `ray.init()` on the machine would join it.
    temp_root = tempfile.mkdtemp(prefix="rdc-", dir="/tmp")
    dash_port = free_port()
    try:
        start_head(env, f"{temp_root}/h", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dash_port}")  # fmt: skip
        # Another Ray on the machine, as users and test sessions have: Ray processes that look
        # for "the" local cluster themselves then find two.
        start_head(env, f"{temp_root}/d", "--num-cpus=0", "--include-dashboard=false")
        dashboard = f"http://127.0.0.1:{dash_port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                headers = {"Authorization": f"Bearer {token}"}
                if requests.get(f"{dashboard}/api/version", headers=headers, timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"no dashboard at {dashboard}"
            time.sleep(1.0)
        gcs = (Path(temp_root) / "h" / "ray_current_cluster").read_text().strip()
        yield Head(env=env, gcs=gcs, dashboard=dashboard)
    finally:
        # Not `ray stop`: it stops every Ray of this user on the machine. Only ours.
        _stop_processes_under(temp_root, grace_s=5)
        shutil.rmtree(temp_root, ignore_errors=True)


def start_head(env: dict[str, str], temp_dir: str, *options: str) -> None:
    ports = (free_port() for _ in range(3))
    started = run(
        str(BIN / "ray"), "start", "--head", "--disable-usage-stats", "--num-gpus=0",
        f"--port={next(ports)}", "--object-store-memory=200000000",
        f"--ray-client-server-port={next(ports)}", f"--dashboard-agent-listen-port={next(ports)}",
        f"--temp-dir={temp_dir}", *options,
        env=env, timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr


def test_connect_ray_joins_the_cluster_in_RAY_ADDRESS(head: Head) -> None:
    """As in a job's driver: no address given, RAY_ADDRESS set. ray.init() refuses local-only
    options (num_cpus...) there, so joining at all shows none were passed."""
    code = (
        "import json, ray\n"
        "from rich.console import Console\n"
        "from raydiology.train.launch import connect_ray\n"
        "c = connect_ray(None, dashboard_host='127.0.0.1', console=Console(stderr=True))\n"
        "print(json.dumps({'gcs': ray.get_runtime_context().gcs_address,\n"
        "    'cpus': ray.cluster_resources().get('CPU'),\n"
        "    'embedded': c.embedded, 'dashboard': c.dashboard_url}))\n"
    )
    env = {**head.env, "RAY_ADDRESS": head.gcs}
    done = run(str(BIN / "python"), "-c", code, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    joined = json.loads(done.stdout.strip().splitlines()[-1])
    assert joined == {"gcs": head.gcs, "cpus": 2.0, "embedded": False, "dashboard": head.dashboard}


def test_embedded_ray_tells_its_workers_where_it_is(head: Head) -> None:
    """No address and no RAY_ADDRESS: `raydiology run` starts its own Ray, even with others on
    the machine, and Ray's State API called in a worker without an address (as Ray Train's
    placement-group cleaner calls it) reaches that Ray, not "multiple active Ray instances"."""
    code = (
        "import json, ray\n"
        "from rich.console import Console\n"
        "from raydiology.train.launch import connect_ray\n"
        "c = connect_ray(None, dashboard_host='127.0.0.1', console=Console(stderr=True))\n"
        "@ray.remote(num_cpus=0)\n"
        "def nodes():\n"
        "    from ray.util.state import list_nodes\n"
        "    return [n.node_id for n in list_nodes()]\n"
        "print(json.dumps({'embedded': c.embedded, 'nodes': ray.get(nodes.remote()),\n"
        "    'node': ray.get_runtime_context().get_node_id(),\n"
        "    'gcs': ray.get_runtime_context().gcs_address}))\n"
    )
    done = run(str(BIN / "python"), "-c", code, env=head.env, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    own = json.loads(done.stdout.strip().splitlines()[-1])
    assert own["embedded"] and own["gcs"] != head.gcs
    assert own["nodes"] == [own["node"]]


def test_ray_job_submit_runs_an_experiment(head: Head, tmp_path: Path) -> None:
    """`ray job submit` (Ray's CLI, not ours) with a working dir, as the README shows; the
    job's log has no traceback even with other Ray instances on the machine."""
    work = tmp_path / "work"  # the experiment files only: the repo holds a .venv
    shutil.copytree(REPO / "experiments", work / "experiments")
    runs = tmp_path / "runs"
    job_id = f"ray-cli-{secrets.token_hex(4)}"
    done = run(
        str(BIN / "ray"), "job", "submit", "--address", head.dashboard,
        "--submission-id", job_id, "--working-dir", str(work), "--",
        "raydiology", "run", "experiments/hd_mae_cam.yaml", "--profile", "smoke",
        "--set", "train.max_steps=2", "--set", "train.checkpoint_every=2",
        "--set", "train.log_every=1", "--set", f"output.dir={runs}",
        env=head.env, timeout=600,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "done step 2" in log
    assert MULTIPLE not in log and "Traceback" not in log, log[-6000:]
    run_dir = runs / "hd_mae_cam"
    assert json.loads((run_dir / "summary.json").read_text())["metrics"]["step"] == 2
    assert (run_dir / "metrics.jsonl").read_text().strip()

    status = run(
        str(BIN / "raydiology"), "status", job_id, "--address", head.dashboard,
        env=head.env, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.startswith("SUCCEEDED"), status.stdout
