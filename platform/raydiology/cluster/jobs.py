"""Ray Jobs over the dashboard's HTTP API, with Ray's token sent on every request.

An open Jobs API is remote code execution for whoever reaches it (CVE-2023-48022), so the
client refuses to talk without a token and stops at the first 401/403 with a message that
says where the token is looked for, instead of retrying.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydiology.config_base import ConfigError, check

# Uploading these would be slow (the venv), private (runs, corpora) or pointless.
WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    "runs",
    "corpora",
    ".gpu",
    "__pycache__",
    "*.egg-info",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "build",
    "*.parquet",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class AuthTokenError(RuntimeError):
    """No token, or the cluster refused the one we sent."""


@dataclass(frozen=True)
class Submitted:
    job_id: str
    dashboard: str

    @property
    def job_url(self) -> str:
        return f"{self.dashboard}/#/jobs/{self.job_id}"


def find_token() -> tuple[str, str]:
    """(token, where it came from), in Ray's order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token. A RAY_AUTH_TOKEN_PATH that cannot be read is an error, not a fallback
    (Ray treats it the same way)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path_env:
        path = Path(path_env).expanduser()
        text = path.read_text().strip() if path.is_file() else ""
        if not text:
            raise AuthTokenError(f"RAY_AUTH_TOKEN_PATH={path_env} is missing or empty")
        return text, f"RAY_AUTH_TOKEN_PATH={path_env}"
    default = Path.home() / ".ray" / "auth_token"
    text = default.read_text().strip() if default.is_file() else ""
    if text:
        return text, str(default)
    raise AuthTokenError(
        "no Ray auth token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, "
        "or write it to ~/.ray/auth_token (on KubeRay: kubectl get secret CLUSTER "
        "-o jsonpath='{.data.auth_token}' | base64 -d)"
    )


class JobsClient:
    """submit / status / logs / stop / list against one cluster's dashboard address."""

    def __init__(self, address: str, *, token: str | None = None) -> None:
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        self.address = address.rstrip("/")
        token, self.token_source = (token, "the token given") if token else find_token()
        self._headers = {"Authorization": f"Bearer {token}"}
        try:
            self._client = JobSubmissionClient(self.address, headers=self._headers)
        except AuthenticationError as e:
            raise self._auth_error(e) from None
        except ConnectionError as e:
            raise ConnectionError(
                f"cannot reach the Ray dashboard at {self.address} ({e}); "
                "on KubeRay: kubectl port-forward svc/CLUSTER-head-svc 8265:8265"
            ) from None

    def _auth_error(self, e: Exception) -> AuthTokenError:
        refused = "403" in str(e) or "invalid" in str(e).lower()
        what = "refused the token" if refused else "asked for a token"
        return AuthTokenError(
            f"{self.address} {what} from {self.token_source}. Use the cluster's own token: "
            "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."
        )

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from ray.exceptions import AuthenticationError

        try:
            return getattr(self._client, method)(*args, **kwargs)
        except AuthenticationError as e:
            raise self._auth_error(e) from None

    def submit(
        self,
        *,
        entrypoint: str,
        job_id: str,
        working_dir: Path,
        metadata: dict[str, str],
        env_vars: dict[str, str] | None = None,
        pip: list[str] | None = None,
    ) -> Submitted:
        """Upload `working_dir` (minus WORKING_DIR_EXCLUDES) and start `entrypoint` in it.

        The package itself travels as a py_module, so the job runs this checkout's code even
        where the image has another raydiology installed.
        """
        import raydiology

        runtime_env: dict[str, Any] = {
            "working_dir": str(working_dir),
            "excludes": WORKING_DIR_EXCLUDES,
            "py_modules": [str(Path(raydiology.__file__).parent)],
            "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", **(env_vars or {})},
        }
        if pip:
            runtime_env["pip"] = pip
        self._call(
            "submit_job",
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata=metadata,
        )
        return Submitted(job_id, self.address)

    def status(self, job_id: str) -> str:
        return str(self._call("get_job_status", job_id).value)

    def info(self, job_id: str) -> Any:
        return self._call("get_job_info", job_id)

    def logs(self, job_id: str) -> str:
        return str(self._call("get_job_logs", job_id))

    def follow(self, job_id: str) -> Iterator[str]:
        """Log chunks as the job writes them, until it ends."""
        stream = self._client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.close()

    def stop(self, job_id: str) -> bool:
        return bool(self._call("stop_job", job_id))

    def list(self) -> list[Any]:
        return sorted(self._call("list_jobs"), key=lambda j: j.start_time or 0, reverse=True)

    def wait(self, job_id: str, *, timeout_s: float, statuses: tuple[str, ...] = TERMINAL) -> str:
        """Poll until the job's status is one of `statuses`; returns it (TimeoutError if not)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if status in statuses:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
            time.sleep(1.0)


def job_id_for(run: str) -> str:
    """Named after the run, unique per submission: raydiology-<run>-<UTC time>-<4 hex>."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", run).strip("-") or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"raydiology-{safe}-{stamp}-{secrets.token_hex(2)}"


def check_shared_dir(value: str | os.PathLike | None, key: str) -> None:
    """Refuse a relative run or sweep folder for a cluster: it would resolve against the job's
    working dir, a temporary copy on the head that no other node sees and that goes with the
    job (and with it a sweep's Tune state, so a retried job could never resume)."""
    text = str(value or "")
    if "://" in text or os.path.isabs(text):
        return
    raise ConfigError(
        key,
        text,
        "shared storage on a cluster: a relative folder would land in the job's temporary "
        "working dir on the head; give a folder that every node mounts, e.g. /mnt/runs (the "
        "presets' volume): --set output.dir=/mnt/runs for a run, --out /mnt/runs/sweeps for a "
        "sweep",
    )


def sweep_job_args(
    *,
    out: str | None = None,
    resume: str | None = None,
    fresh: bool = False,
    max_cluster: str | None = None,
    cluster: str | None = None,
) -> list[str]:
    """The `raydiology sweep` options of a submitted sweep: its sweeps folder, what to resume,
    and the cluster's maximum size (`--cluster`'s preset, with `--max-cluster` over it), so
    that the job checks the sweep against the grown cluster rather than the fresh one."""
    from raydiology.tune.capacity import cluster_maximum, format_resources

    args = ["--out", out] if out else []
    args += ["--resume", resume] if resume else []
    args += ["--fresh"] if fresh else []
    maximum = cluster_maximum(cluster, max_cluster)
    args += ["--max-cluster", format_resources(maximum)] if maximum else []
    return args


def job_options(
    path: Path,
    *,
    out: str | None = None,
    resume: str | None = None,
    fresh: bool = False,
    max_cluster: str | None = None,
    cluster: str | None = None,
    allow_changes: str | None = None,
) -> list[str]:
    """Options after the job's `raydiology run|sweep PATH ...`: `--address auto`, for a sweep
    `sweep_job_args`, for an experiment `--allow-changes`. An option of the other kind is
    refused by name."""
    import yaml

    from raydiology.cluster.workload import is_sweep

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError("experiment", str(path), f"a readable YAML file ({e})") from None
    options = ["--address", "auto"]
    if is_sweep(raw):
        check(
            not allow_changes,
            "--allow-changes",
            str(path),
            "an experiment file (a sweep resumes its trials as they were started)",
        )
        return options + sweep_job_args(
            out=out, resume=resume, fresh=fresh, max_cluster=max_cluster, cluster=cluster
        )
    given = [
        name
        for name, value in (
            ("--out", out),
            ("--resume", resume),
            ("--fresh", fresh),
            ("--max-cluster", max_cluster),
        )
        if value
    ]
    check(
        not given,
        ", ".join(given),
        str(path),
        "a sweep file for these options; an experiment's run folder is output.dir/output.name "
        "(--set output.dir=/mnt/runs), and submitting it again continues that run",
    )
    return options + (["--allow-changes", allow_changes] if allow_changes else [])
