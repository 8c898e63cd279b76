"""`raydiology run` on a Ray cluster of several nodes on this machine, and the faults such a
cluster has: a training worker killed, a whole node lost, a checkpoint damaged on disk.

The cluster (tests/multinode_cluster.py) runs in subprocesses beside the test session's own
Ray: a head with no CPUs (driver, Train controller, Ray Data's coordinators), a CPU-only
"data" node, and trainer nodes with one `trainer_slot` and one CPU each, so each Ray Train
worker (`scaling.resources_per_worker: {trainer_slot: 1}`, 1 CPU) sits on a node of its own
and Ray Data's read/decode tasks can only run on the data node. Checkpoints go to a shared
folder given as a file:// URI.

What "nothing lost" means here, from the pipeline: the phantom corpus is one row group of
66 images, so Ray Data makes one block and Ray Train's `streaming_split(2, equal=True)`
gives each worker 33 rows; micro-batches of 4 with drop_last make 8 steps per epoch and
leave one row per worker out. A run of 8 steps ends exactly with epoch 0, and its final
checkpoint's consumed row keys (the loop's record of what each rank trained on in the
epoch, carried across resumes) must be 64 distinct corpus rows, whatever was killed.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from multinode_cluster import NODE_LABEL, LocalCluster, wait_for

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = str(REPO / "experiments" / "hd_mae_cam.yaml")
SLOT = "trainer_slot"
IMAGES, WORKERS, MICRO_BATCH = 66, 2, 4
STEPS_PER_EPOCH = IMAGES // WORKERS // MICRO_BATCH  # 8: 33 rows a worker, one dropped
MAX_STEPS = STEPS_PER_EPOCH
SETTINGS = (
    "data.resolution=64", "data.phantom.size=64", f"data.phantom.images={IMAGES}",
    "train.zero_stage=1", f"train.micro_batch_size={MICRO_BATCH}", f"train.max_steps={MAX_STEPS}",
    "train.checkpoint_every=2", "train.log_every=1",
    f"scaling.num_workers={WORKERS}", "scaling.cpus_per_worker=1",
    f"scaling.resources_per_worker={{{SLOT}: 1}}", "scaling.max_failures=1",
)  # fmt: skip
RUN_TIMEOUT = 420  # seconds; a run with one restart takes ~1-2 min on an idle 2-core machine


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster() as c:
        c.add_nodes({"data": (2, {"data": 1}), "t1": (1, {SLOT: 1}), "t2": (1, {SLOT: 1})})
        yield c


@dataclass
class Run:
    """One `raydiology run` launch; launches with the same root and name are one run."""

    root: Path  # output.dir, given as file://<root>
    name: str
    attempt: str = "1"
    log: str = ""  # the driver's console output, once it finished
    placement: dict[str, list[str]] | None = None

    @property
    def run_dir(self) -> Path:
        return self.root / self.name

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}-{self.attempt}.log"


def start(cluster: LocalCluster, run: Run, *sets: str, allow: str = "") -> subprocess.Popen[bytes]:
    args = ["run", EXPERIMENT, "--profile", "smoke"]
    for s in (*SETTINGS, f"output.dir=file://{run.root}", f"output.name={run.name}", *sets):
        args += ["--set", s]
    if allow:  # settings a rerun may change (`--allow-changes`)
        args += ["--allow-changes", allow]
    run.root.mkdir(parents=True, exist_ok=True)
    return cluster.raydiology(*args, log=run.log_path)


def finish(proc: subprocess.Popen[bytes], run: Run) -> Run:
    try:
        returncode = proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        run.log = run.log_path.read_text(errors="replace")
    assert returncode == 0, run.log[-8000:]
    return run


def metrics(run: Run) -> list[dict]:
    path = run.run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def first_checkpoint(run: Run, proc: subprocess.Popen[bytes]) -> dict:
    def found() -> dict | None:
        if proc.poll() is not None:
            raise AssertionError(run.log_path.read_text(errors="replace")[-8000:])
        return next((r for r in metrics(run) if r.get("checkpoint")), None)

    return wait_for(found, timeout=RUN_TIMEOUT, what="the run's first checkpoint")


def placement(cluster: LocalCluster) -> dict[str, list[str]]:
    """Task name -> the nodes that ran it, for the latest `raydiology run` on the cluster."""
    return cluster.python(f"""
import json
from ray.util.state import list_nodes, list_tasks
names = {{n.node_id: n.labels.get({NODE_LABEL!r}, "head") for n in list_nodes(limit=100)}}
tasks = list_tasks(limit=10000, raise_on_missing_output=False)
order = lambda job: int.from_bytes(bytes.fromhex(job), "little")
job = max((t.job_id for t in tasks if t.name == "TrainController.run"), key=order)
out = {{}}
for t in tasks:
    if t.job_id == job and t.node_id:
        out.setdefault(t.name, set()).add(names.get(t.node_id, t.node_id))
print(json.dumps({{k: sorted(v) for k, v in out.items()}}))
""")


def corpus_keys(run: Run) -> set[int]:
    import pyarrow.parquet as pq

    from raydiology.data.corpus import shard_paths
    from raydiology.data.pipeline import row_keys

    (corpus,) = (run.root / "_corpora").iterdir()
    ids = np.concatenate([pq.read_table(p, columns=["image_id"])["image_id"].to_numpy(zero_copy_only=False)
                          for p in shard_paths(corpus)])  # fmt: skip
    assert len(ids) == IMAGES
    return set(row_keys(ids).tolist())


def assert_nothing_lost(run: Run) -> None:
    """Finished at max_steps, at the end of epoch 0, each image of it trained on once."""
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["metrics"]["step"] == MAX_STEPS
    final = Path(summary["checkpoint"])
    assert final.parent == run.run_dir  # under the shared storage path
    assert json.loads((final / "train_state.json").read_text()) == {"step": MAX_STEPS, "epoch": 0}
    parts = [np.load(p) for p in sorted((final / "consumed").glob("rank-*.npy"))]
    assert len(parts) == WORKERS
    keys = np.concatenate(parts)
    assert len(keys) == len(set(keys.tolist())), "an image was trained on twice in epoch 0"
    assert set(keys.tolist()) <= corpus_keys(run)
    # 66 rows, 33 a worker, drop_last leaves one a worker: 64 trained on
    assert len(keys) == WORKERS * STEPS_PER_EPOCH * MICRO_BATCH, "images of epoch 0 were skipped"


def assert_resumed(run: Run) -> None:
    assert "resumed from step" in run.log, run.log[-8000:]
    steps = [r["step"] for r in metrics(run)]
    assert steps[-1] == MAX_STEPS and set(steps) == set(range(1, MAX_STEPS + 1)), steps


@pytest.fixture(scope="module")
def killed_worker_run(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One run whose worker on t1 is SIGKILLed after its first checkpoint."""
    run = Run(tmp_path_factory.mktemp("shared") / "runs", "kill-worker")
    proc = start(cluster, run)
    try:
        first_checkpoint(run, proc)
        (victim,) = cluster.train_workers("t1")
        victim.kill()  # SIGKILL, mid-epoch
    finally:
        finish(proc, run)
    run.placement = placement(cluster)
    return run


@pytest.mark.ray
def test_workers_on_their_own_nodes_data_on_the_data_node(killed_worker_run: Run) -> None:
    run = killed_worker_run
    placed = run.placement or {}
    assert placed["RayTrainWorker.run_train_fn"] == ["t1", "t2"], placed
    # Ray Data's read/decode (and the split of its block between the workers): data node only
    assert placed["MapBatches(read_row_group)"] == ["data"], placed
    assert set(placed.get("_split_single_block", ["data"])) == {"data"}, placed
    # storage: a file:// URI, checkpoints and the run directory's files under it
    assert (run.run_dir / "checkpoint_manager_snapshot.json").is_file()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "export/encoder.json"):
        assert (run.run_dir / name).is_file(), name
    saved = [Path(r["checkpoint"]) for r in metrics(run) if r.get("checkpoint")]
    assert saved and all(path.parent == run.run_dir for path in saved), saved


@pytest.mark.ray
def test_killed_worker_restarts_from_its_checkpoint_losing_nothing(killed_worker_run: Run) -> None:
    run = killed_worker_run
    assert_resumed(run)
    assert_nothing_lost(run)


@pytest.mark.ray
def test_damaged_latest_checkpoint_is_skipped_for_the_one_before(
    cluster: LocalCluster, killed_worker_run: Run
) -> None:
    run = killed_worker_run
    # a folder the killed attempt began but never finished has no train_state.json
    kept = sorted(
        (json.loads((c / "train_state.json").read_text())["step"], c)
        for c in run.run_dir.glob("checkpoint_*")
        if (c / "train_state.json").is_file()
    )
    (previous_step, previous), (latest_step, latest) = kept[-2:]
    assert latest_step == MAX_STEPS
    damaged = latest / "deepspeed" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a cut-off write
    before = len(metrics(run))

    rerun = Run(run.root, run.name, attempt="2")
    finish(
        start(cluster, rerun, f"train.max_steps={MAX_STEPS + 2}", allow="train.max_steps"), rerun
    )
    assert f"checkpoint {latest} is damaged" in rerun.log, rerun.log[-8000:]
    assert "mp_rank_00_model_states.pt has" in rerun.log
    assert f"resuming from the checkpoint before it, {previous}" in rerun.log
    assert f"resumed from step {previous_step}" in rerun.log
    steps = [r["step"] for r in metrics(rerun)[before:]]
    assert steps == list(range(previous_step + 1, MAX_STEPS + 3)), steps
    summary = json.loads((rerun.run_dir / "summary.json").read_text())
    assert summary["metrics"]["step"] == MAX_STEPS + 2


@pytest.mark.ray
def test_lost_node_is_replaced_by_a_spare_losing_nothing(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    run = Run(tmp_path / "runs", "lose-node")
    proc = start(cluster, run)
    try:
        wait_for(lambda: cluster.train_workers("t2"), timeout=RUN_TIMEOUT, what="a worker on t2")
        # the spare joins once both workers hold their nodes (its CPU would otherwise draw
        # Ray Data's tasks), long before the first checkpoint
        cluster.add_node("t3", cpus=1, resources={SLOT: 1})
        first_checkpoint(run, proc)
        cluster.kill_node("t2")
    finally:
        finish(proc, run)
    assert placement(cluster)["RayTrainWorker.run_train_fn"] == ["t1", "t2", "t3"]
    assert_resumed(run)
    assert_nothing_lost(run)


def _fake_launch(monkeypatch: pytest.MonkeyPatch, seen: dict) -> None:
    """run_experiment without Ray: what it hands the trainer and where it writes."""
    from raydiology.train import launch

    def build(exp, corpus_dir, run_dir, **options):
        seen.update(run_dir=run_dir, storage=options["storage_path"])
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
        return type("Trainer", (), {"fit": lambda self: None})()

    def summarise(result, run_dir, console, select=False):
        (run_dir / "summary.json").write_text("{}")
        return launch.RunResult(run_dir, None, None, None, {})

    def corpus(exp, console):
        seen["corpus_root"] = exp.output.dir
        return "corpus"

    monkeypatch.setattr(launch, "resolve_corpus", corpus)
    monkeypatch.setattr(launch, "connect_ray", lambda *a, **k: launch.RayConnection(None, False))
    monkeypatch.setattr(launch, "_build_trainer", build)
    monkeypatch.setattr(launch, "_summarise", summarise)


def test_output_uris_reach_ray_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.fs
    from rich.console import Console

    from raydiology.config import load_experiment
    from raydiology.train.launch import run_experiment

    monkeypatch.chdir(tmp_path)
    quiet = Console(quiet=True)
    seen: dict = {}
    _fake_launch(monkeypatch, seen)

    # file://: Ray gets the URI; the run directory is the path it names
    shared = tmp_path / "shared"
    exp = load_experiment(EXPERIMENT, profile="smoke", overrides=[f"output.dir=file://{shared}"])
    run_experiment(exp, console=quiet)
    assert seen["storage"] == f"file://{shared}"
    assert seen["run_dir"] == shared / "hd_mae_cam" and seen["corpus_root"] == str(shared)
    assert (shared / "hd_mae_cam" / "config.yaml").is_file()

    # a remote URI: Ray gets it unchanged; the run directory is ./runs/<name> on the driver
    # and its config, metrics and summary are uploaded beside the checkpoints at the end
    bucket = tmp_path / "bucket"
    uploads: list[str] = []

    class Bucket:  # s3://bucket/... as a local folder
        @staticmethod
        def from_uri(uri: str):
            uploads.append(uri)
            return pyarrow.fs.LocalFileSystem(), str(bucket / uri.removeprefix("s3://bucket/"))

    monkeypatch.setattr(pyarrow.fs, "FileSystem", Bucket)
    (bucket / "runs" / "hd_mae_cam").mkdir(parents=True)
    exp = load_experiment(EXPERIMENT, profile="smoke", overrides=["output.dir=s3://bucket/runs"])
    run_experiment(exp, console=quiet)
    # opened twice: the run's saved config read (none yet), then its files uploaded
    assert seen["storage"] == "s3://bucket/runs" and set(uploads) == {"s3://bucket/runs"}
    local = tmp_path / "runs" / "hd_mae_cam"
    assert seen["run_dir"] == local and seen["corpus_root"] == str(tmp_path / "runs")
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (bucket / "runs" / "hd_mae_cam" / name).read_bytes() == (local / name).read_bytes()
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "file:").exists()


def test_scaling_and_output_settings_are_checked() -> None:
    from raydiology.config import load_experiment
    from raydiology.config_base import ConfigError

    exp = load_experiment(EXPERIMENT, overrides=["scaling.resources_per_worker={trainer_slot: 1}"])
    assert exp.scaling.resources_per_worker == {"trainer_slot": 1}
    for bad in ("{CPU: 1}", "{trainer_slot: 0}", "{trainer_slot: yes}", "[1]"):
        with pytest.raises(ConfigError, match="resources_per_worker"):
            load_experiment(EXPERIMENT, overrides=[f"scaling.resources_per_worker={bad}"])
    with pytest.raises(ConfigError, match=r"output\.dir"):
        load_experiment(EXPERIMENT, overrides=["output.dir=file://runs"])
