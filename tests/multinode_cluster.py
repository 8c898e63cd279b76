"""A Ray cluster of several nodes on this machine, each node a `ray start` with its own temp
dir, CPUs and custom resources, for the multi-node and fault-injection tests.

Everything runs in subprocesses: the test session's own Ray (tests/conftest.py) is neither
joined nor disturbed, and a node is stopped (or killed, to inject a fault) by the processes
that name its temp dir, never by `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from raydiology.cluster.localhead import _stop_processes_under, free_port

BIN = Path(sys.executable).parent  # `ray`, `raydiology` and `python` of this venv
NODE_LABEL = "raydiology-test-node"  # each node's name, as the State API lists it
_EXTENSIONS = Path.home() / ".cache" / "raydiology" / "torch_extensions-by-venv"
_OWN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")


@dataclass
class LocalCluster:
    """`with LocalCluster() as c: c.add_node("t1", cpus=1, resources={...})`.

    The head has no CPUs (the driver, the Train controller and Ray Data's coordinators need
    none), so every task and worker lands on a node the test added and sized.
    """

    token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: dict[str, str] = field(default_factory=dict)  # name -> temp dir

    def __post_init__(self) -> None:
        # Ray's Unix sockets live under the temp dirs: keep their paths short.
        self.root = tempfile.mkdtemp(prefix="rdm-", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items() if k not in _OWN_ENV}
        self.env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,  # ours, never the user's ~/.ray token
            PATH=f"{BIN}{os.pathsep}{self.env.get('PATH', '')}",
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
            # DeepSpeed's JIT-built op, cached per virtual environment: checkouts sharing one
            # cache folder overwrite each other's build (~40 s to rebuild on every start)
            TORCH_EXTENSIONS_DIR=str(
                _EXTENSIONS / hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
            ),
            # A node whose raylet was killed is declared dead within ~2 s, not ~30 s.
            RAY_health_check_period_ms="500",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        self.gcs = ""
        self.dashboard = ""

    def __enter__(self) -> LocalCluster:
        try:
            port, dash = free_port(), free_port()
            head = self._start("head", 0, {}, "--head", f"--port={port}",
                               "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                               f"--dashboard-port={dash}")  # fmt: skip
            self._started("head", head)
            self.gcs = f"127.0.0.1:{port}"
            self.dashboard = f"http://127.0.0.1:{dash}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        _stop_processes_under(self.root, grace_s=5)
        shutil.rmtree(self.root, ignore_errors=True)

    def add_node(self, name: str, *, cpus: int, resources: dict[str, float]) -> None:
        self.add_nodes({name: (cpus, resources)})

    def add_nodes(self, nodes: dict[str, tuple[int, dict[str, float]]]) -> None:
        """Start worker nodes at once: name -> (CPUs, custom resources)."""
        starting = [
            (name, self._start(name, cpus, resources, f"--address={self.gcs}"))
            for name, (cpus, resources) in nodes.items()
        ]
        for name, proc in starting:
            self._started(name, proc)

    def _start(
        self, name: str, cpus: int, resources: dict[str, float], *options: str
    ) -> subprocess.Popen[str]:
        temp_dir = f"{self.root}/{name}"
        ports = [free_port() for _ in range(4)]
        command = [
            str(BIN / "ray"), "start", "--disable-usage-stats", f"--num-cpus={cpus}",
            "--num-gpus=0", f"--resources={json.dumps(resources)}",
            f"--labels={NODE_LABEL}={name}",
            "--object-store-memory=100000000", f"--temp-dir={temp_dir}",
            f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}", f"--metrics-export-port={ports[3]}",
            *options,
        ]  # fmt: skip
        self.nodes[name] = temp_dir  # from now on, stopped with the cluster
        return subprocess.Popen(
            command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def _started(self, name: str, proc: subprocess.Popen[str]) -> None:
        output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{output}")

    def processes(self, name: str) -> list[psutil.Process]:
        """Every process of node `name`: those naming its temp dir, and their children."""
        temp_dir = self.nodes[name] + "/"
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(temp_dir in part for part in proc.info["cmdline"] or []):
                    found[proc.pid] = proc
                    found.update((c.pid, c) for c in proc.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    def train_workers(self, name: str) -> list[psutil.Process]:
        """Ray Train worker processes on node `name` (Ray titles them ray::RayTrainWorker)."""
        out = []
        for proc in self.processes(name):
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    out.append(proc)
            except psutil.NoSuchProcess:
                continue
        return out

    def kill_node(self, name: str) -> None:
        """The node vanishes: SIGKILL its raylet, agents and workers at once."""
        for proc in self.processes(name):
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue
        del self.nodes[name]

    def python(self, code: str, *, timeout: float = 120) -> Any:
        """Run `code` in a fresh interpreter joined to this cluster; its last stdout line, as
        JSON (e.g. the State API's answers, which need the cluster's token)."""
        env = {**self.env, "RAY_ADDRESS": self.gcs}
        done = subprocess.run(
            [str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-4000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    def raydiology(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        """`raydiology ARGS --address <this cluster>` as a user runs it, output to `log`."""
        env = {**self.env, "RAY_ADDRESS": self.gcs}
        with open(log, "wb") as out:
            return subprocess.Popen(
                [str(BIN / "raydiology"), *args], env=env, stdout=out, stderr=subprocess.STDOUT
            )


def wait_for(predicate, *, timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(every)
