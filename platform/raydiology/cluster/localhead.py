"""A throwaway Ray head on this machine, set up like a real cluster's: dashboard and Jobs API on
127.0.0.1 only, token authentication on, its own ports and temp dir.

For trying `raydiology submit` without a cluster, and for the tests of the Jobs API and the
metrics endpoint (separate from the test session's embedded Ray, which a process can hold
only one of).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalHead:
    """`with LocalHead(num_cpus=2) as head:` -> head.dashboard, head.token, head.metrics_url."""

    num_cpus: int = 2
    object_store_mb: int = 300
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the head
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    def __post_init__(self) -> None:
        self.gcs_port, self.dashboard_port, self.metrics_port = (free_port() for _ in range(3))
        # Ray's Unix sockets live under the temp dir: keep its path short.
        self.temp_dir = tempfile.mkdtemp(prefix="rdh-", dir="/tmp")
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        bin_dir = Path(sys.executable).parent
        self._environ = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,  # highest precedence: never the user's ~/.ray token
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # `raydiology`, `python`
            "RAY_metrics_report_interval_ms": "1000",
            **self.env,
        }
        self._environ.pop("RAY_ADDRESS", None)

    def __enter__(self) -> LocalHead:
        ray = str(Path(sys.executable).parent / "ray")
        ports = [free_port() for _ in range(2)]
        command = [
            ray, "start", "--head", "--disable-usage-stats",
            f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            f"--port={self.gcs_port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--metrics-export-port={self.metrics_port}",
            f"--ray-client-server-port={ports[0]}",
            f"--dashboard-agent-listen-port={ports[1]}",
            f"--temp-dir={self.temp_dir}",
        ]  # fmt: skip
        done = subprocess.run(command, env=self._environ, capture_output=True, text=True)
        if done.returncode != 0:
            self._cleanup()
            raise RuntimeError(f"ray start failed:\n{done.stdout}\n{done.stderr}")
        try:
            self._wait_for_dashboard()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_dashboard(self, timeout_s: float = 90.0) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.token}"}
        while True:
            try:
                if requests.get(f"{self.dashboard}/api/version", headers=headers, timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dashboard at {self.dashboard} did not come up")
            time.sleep(1.0)

    def __exit__(self, *exc: object) -> None:
        # `ray stop` would stop every Ray of this user on the machine; stop only ours, found
        # by our temp dir on their command lines.
        _stop_processes_under(self.temp_dir)
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _stop_processes_under(temp_dir: str, grace_s: float = 10.0) -> None:
    """Terminate the processes whose command line names `temp_dir` (this head's GCS, raylet,
    dashboard, agents) and the workers they started, then kill what is left."""
    import psutil

    ours = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                ours.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    family = {p.pid: p for p in ours}
    for proc in ours:
        try:
            for child in proc.children(recursive=True):
                family[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    for proc in family.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(list(family.values()), timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
