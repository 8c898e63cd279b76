"""Sweeps on a real local Ray Tune: a 4-trial ASHA smoke sweep and its results (stopped trials
free their placement groups), a rerun resuming after the driver was killed, and refusals
before Ray starts: resources against the cluster's maximum size, sweep folders, relative
folders on a cluster, the yardstick's bounded probe corpus and its task's resources."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.config import load_experiment
from raydiology.config_base import ConfigError
from raydiology.train.launch import read_metrics
from raydiology.tune.capacity import (
    check_cluster,
    check_resources,
    cluster_maximum,
    parse_resources,
    preset_capacity,
)
from raydiology.tune.runner import TRIAL_FILE, run_sweep, sweep_mode
from raydiology.tune.spec import (
    NOT_SET,
    TUNE_DIR,
    grid_points,
    local_folder,
    make_plan,
    parse_search,
)

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "experiments" / "hd_mae_cam.yaml")
# Tiny trials: 6 steps of 2 x 4 images at 64 px on a 32-image phantom corpus.
TINY = [
    "train.max_steps=6",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "data.phantom.images=32",
    "data.phantom.size=64",
    "data.resolution=64",
]


def write_sweep(folder: Path, search: dict, **extra) -> Path:
    spec = {"name": "t", "base": BASE, "metric": "loss", "mode": "min", "search": search}
    spec.update(extra)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


MASK_SEARCH = {
    "objective.masking.strategy": {"grid": ["random", "context_aware"]},
    "objective.masking.ratio": {
        "grid": [0.6, 0.9],
        "when": {"objective.masking.strategy": "random"},
    },
    "objective.masking.inside_ratio": {
        "grid": [0.6, 0.95],
        "when": {"objective.masking.strategy": "context_aware"},
    },
}


# ----------------------------------------------------------------------------- no Ray


def test_search_space_grid_conditionals_and_follows():
    params = parse_search(
        {
            "data.resolution": [224, 512],
            "model.patch_size": {"follows": "data.resolution", "values": {224: 16, 512: 32}},
            "objective.masking.strategy": {"grid": ["random", "context_aware"]},
            "objective.masking.ratio": {
                "grid": [0.75, 0.9],
                "when": {"objective.masking.strategy": "random"},
            },
            "train.optimizer.lr": {"loguniform": [1e-4, 1e-3]},
        }
    )
    points = grid_points(params)
    assert len(points) == 2 * (2 + 1)
    assert all(p["model.patch_size"] == {224: 16, 512: 32}[p["data.resolution"]] for p in points)
    cam = [p for p in points if p["objective.masking.strategy"] == "context_aware"]
    assert cam and all("objective.masking.ratio" not in p for p in cam)
    with pytest.raises(ConfigError, match=r"search\.a\.b\.when"):
        parse_search({"a.b": {"grid": [1], "when": {"c.d": 1}}})  # c.d is not an earlier grid
    with pytest.raises(ConfigError, match=r"search\.x\.y\.uniform"):
        parse_search({"x.y": {"uniform": [1.0, 0.5]}})


def test_unknown_key_and_bad_value_refused_naming_them(tmp_path):
    bad_key = write_sweep(tmp_path, {"objective.masking.insde_ratio": [0.9]})
    with pytest.raises(ConfigError) as e:
        make_plan(bad_key, profile="smoke", sweep_dir=tmp_path / "out")
    assert e.value.key == "objective.masking.insde_ratio"
    bad_value = write_sweep(tmp_path, {"objective.masking.inside_ratio": [0.9, 1.5]})
    with pytest.raises(ConfigError) as e:
        make_plan(bad_value, profile="smoke", sweep_dir=tmp_path / "out")
    assert e.value.key == "objective.masking.inside_ratio" and e.value.value == 1.5


def test_resources_must_fit_the_cluster(tmp_path):
    path = write_sweep(tmp_path, MASK_SEARCH, resources={"parallel": 2})
    plan = make_plan(path, profile="smoke", sets=TINY, sweep_dir=tmp_path / "out")
    check_resources(plan, {"CPU": 4.0})  # 2 trials x (2 x 0.5 CPU) + 1 for Ray Data
    with pytest.raises(ConfigError) as e:
        check_resources(plan, {"CPU": 2.0})
    assert e.value.key == "resources.parallel" and e.value.value == 2
    gpu = make_plan(path, sweep_dir=tmp_path / "out2")  # the paper's 8 GPUs a trial
    with pytest.raises(ConfigError, match="scaling"):
        check_resources(gpu, {"CPU": 128.0, "GPU": 4.0})


def test_invalid_resolution_refused_before_ray_starts(tmp_path):
    """200 px is not a multiple of the smoke model's 16-px patches: the CLI refuses it, naming
    the key and value, and Ray is never started (checked in a fresh process)."""
    path = write_sweep(tmp_path, {"data.resolution": [128, 200]})
    script = (
        "import sys, ray\n"
        "from raydiology.cli import app\n"
        "try:\n"
        f"    app(['sweep', {str(path)!r}, '--profile', 'smoke', '--out', {str(tmp_path)!r}])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('RAY_INITIALIZED', ray.is_initialized())\n"
        "sys.exit(code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "data.resolution" in text and "200" in text and "patch size" in text, text
    assert "RAY_INITIALIZED False" in text, text
    assert not (tmp_path / "t").exists()


def test_resources_checked_against_the_clusters_maximum_size(tmp_path):
    """A paper-sized trial (8 GPUs) on an autoscaling cluster that has no GPU yet: refused
    only when it cannot fit the cluster fully grown, with a warning naming what is missing."""
    path = write_sweep(tmp_path, MASK_SEARCH, resources={"parallel": 2})
    plan = make_plan(path, sweep_dir=tmp_path / "out")  # 2 trials x 8 GPUs
    fresh_cluster = {"CPU": 8.0}  # the head only: the GPU groups start at 0 replicas

    a800 = preset_capacity("a800")
    from raydiology.cluster.presets import load_preset

    groups = load_preset("a800")
    assert a800["GPU"] == groups.gpu_nodes.gpus * groups.gpu_nodes.max_replicas >= 16
    assert a800["CPU"] == (
        groups.gpu_nodes.cpus * groups.gpu_nodes.max_replicas
        + groups.cpu_nodes.cpus * groups.cpu_nodes.max_replicas
    )
    console = Console(record=True, width=300)
    check_cluster(plan, fresh_cluster, a800, console=console)  # fits once grown: a warning
    said = console.export_text()
    assert "warning" in said and "16 GPU (has 0)" in said and "autoscaler" in said, said

    with pytest.raises(ConfigError) as e:  # never fits: 2 x 8 GPUs on at most 8
        check_cluster(plan, fresh_cluster, parse_resources("gpu=8,CPU=128"), console=console)
    assert e.value.key == "resources.parallel" and "maximum" in str(e.value)
    with pytest.raises(ConfigError) as e:  # no maximum known: the size now, and how to say it
        check_cluster(plan, fresh_cluster, None, console=console)
    assert "--max-cluster" in str(e.value) and "--cluster" in str(e.value)

    assert cluster_maximum("a800", "GPU=16") == {**a800, "GPU": 16.0}
    assert cluster_maximum(None, None) is None
    for bad in ("GPU", "GPU=many", "=4", "GPU=-1"):
        with pytest.raises(ConfigError, match="--max-cluster"):
            parse_resources(bad)


def test_one_sweep_folder_resumed_refused_or_started(tmp_path):
    """The folder is output.dir/<sweep name> (no time stamp): with Tune's state in it the
    sweep resumes; --fresh refuses it, and so does a changed sweep; errors name the folder."""
    path = write_sweep(tmp_path, MASK_SEARCH, output={"dir": str(tmp_path / "sweeps")})
    plan = make_plan(path, profile="smoke", sets=TINY)
    folder = tmp_path / "sweeps" / "t"
    assert plan.sweep_dir == str(folder)
    quiet = Console(record=True, width=300)
    assert sweep_mode(plan, resume=False, fresh=False, console=quiet) is False
    assert sweep_mode(plan, resume=False, fresh=True, console=quiet) is False
    with pytest.raises(ConfigError, match="--resume") as e:
        sweep_mode(plan, resume=True, fresh=False, console=quiet)
    assert str(folder) in str(e.value)

    plan.save()
    (folder / TUNE_DIR).mkdir()
    (folder / TUNE_DIR / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    assert sweep_mode(plan, resume=False, fresh=False, console=quiet) is True
    assert f"resuming the sweep in {folder}" in quiet.export_text()
    with pytest.raises(ConfigError) as e:
        sweep_mode(plan, resume=False, fresh=True, console=quiet)
    assert e.value.key == "--fresh" and str(folder) in str(e.value) and "--out" in str(e.value)
    changed = make_plan(path, profile="smoke", sets=[*TINY, "train.max_steps=8"])
    with pytest.raises(ConfigError) as e:
        sweep_mode(changed, resume=False, fresh=False, console=quiet)
    assert str(folder) in str(e.value) and "differs in sets" in str(e.value)


def test_cluster_sweep_needs_shared_storage(tmp_path, monkeypatch):
    """On a cluster (--address or RAY_ADDRESS) a relative output.dir is refused, naming shared
    storage, before anything starts; object-store URIs are named, never resolved into
    folders."""
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, MASK_SEARCH, output={"dir": "runs"})
    result = CliRunner().invoke(
        app, ["sweep", str(path), "--profile", "smoke", "--address", "10.0.0.1:6379"]
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "output.dir" in text and "'runs'" in text and "shared storage" in text, text
    assert "/mnt/runs" in text and not (tmp_path / "runs").exists()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", "sweeps"])
    assert result.exit_code == 2 and "--out" in result.output, result.output

    assert local_folder("file:///mnt/runs/sweeps", "--out") == Path("/mnt/runs/sweeps")
    with pytest.raises(ConfigError, match="mount the bucket"):
        local_folder("s3://bucket/sweeps", "--out")
    assert not (tmp_path / "s3:").exists()


def test_yardstick_on_a_bounded_probe_corpus_in_a_task_that_holds_resources(tmp_path):
    """The probe corpus is a fixed sample of at most probe.max_images images (the same ids
    every time), the yardstick embeds only those, and its task reserves a CPU (a GPU too
    after GPU training), never nothing."""
    import torch

    from raydiology.data.corpus import read_manifest, read_rows
    from raydiology.data.phantom import write_phantom_corpus
    from raydiology.registry import build_model, build_objective
    from raydiology.train.export import export_encoder
    from raydiology.tune.spec import ProbeMetricConfig
    from raydiology.tune.yardstick import bounded_corpus, score_options, yardstick

    source = tmp_path / "corpus"
    write_phantom_corpus(source, n=60, size=64, progress=False)
    made = bounded_corpus(str(source), str(tmp_path / "a"), 30)
    again = bounded_corpus(str(source), str(tmp_path / "b"), 30)
    ids = read_rows(made, columns=["image_id"]).column(0).to_pylist()
    assert read_manifest(made).rows == len(ids) == 30
    assert ids == read_rows(again, columns=["image_id"]).column(0).to_pylist()
    everything = read_rows(source, columns=["image_id"]).column(0).to_pylist()
    assert ids == [i for i in everything if i in set(ids)]  # the source's order
    assert read_manifest(made).label_columns == read_manifest(source).label_columns

    exp = load_experiment(BASE, profile="smoke", overrides=["data.resolution=64"])
    torch.manual_seed(0)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    export = export_encoder(objective, tmp_path / "export", exp=exp, corpus_sha256=None, step=0)
    probe = ProbeMetricConfig(max_epochs=2, retrieval_k=3, max_images=30)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    scores = yardstick(Path(export), probe, made, run_dir)
    assert scores["probe_images"] == 30  # rows embedded
    probed = json.loads((run_dir / "probe.json").read_text())
    assert probed["corpus"] == made
    # XR-0's protocol by default (the sweep's max_epochs on top), XR-0's relevance
    assert probed["config"]["monitor"] == "score" and probed["config"]["weight_decay"] == 1e-6
    assert probed["config"]["max_epochs"] == 2
    assert json.loads((run_dir / "retrieval.json").read_text())["match"] == "any"

    cpu = score_options(exp.scaling)
    assert cpu["num_cpus"] >= 1 and "num_gpus" not in cpu
    gpu_exp = load_experiment(BASE)  # the paper's GPU workers
    gpu = score_options(gpu_exp.scaling)
    assert gpu["num_cpus"] >= 1 and gpu["num_gpus"] == 1
    assert cpu["scheduling_strategy"] == "DEFAULT"  # not in the trial's 0-CPU group


# ----------------------------------------------------------------------------- real Ray


@pytest.mark.ray
def test_smoke_mask_ratio_sweep_with_asha(ray_cluster, tmp_path):
    path = write_sweep(
        tmp_path,
        MASK_SEARCH,
        scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 2},
    )
    plan = make_plan(path, profile="smoke", sets=TINY, sweep_dir=tmp_path / "sweep")
    rows = run_sweep(plan)
    out = tmp_path / "sweep"

    assert len(rows) == 4
    assert {r["status"] for r in rows} <= {"finished", "stopped"}
    assert sum(r["status"] == "finished" for r in rows) >= 1
    assert {
        (
            r["objective.masking.strategy"],
            r["objective.masking.ratio"],
            r["objective.masking.inside_ratio"],
        )
        for r in rows
    } == {
        ("random", 0.6, NOT_SET),
        ("random", 0.9, NOT_SET),
        ("context_aware", NOT_SET, 0.6),
        ("context_aware", NOT_SET, 0.95),
    }
    for row in rows:  # each trial is a normal run directory, its numbers in the table
        run_dir = Path(row["run_dir"])
        assert (run_dir / "config.yaml").is_file()
        metrics = read_metrics(run_dir)
        assert row["loss"] == metrics[-1]["loss"] and row["step"] == metrics[-1]["step"]
        cfg = load_experiment(run_dir / "config.yaml")
        assert cfg.objective.config.masking.strategy == row["objective.masking.strategy"]
        assert row["wall_s"] > 0 and row["images_per_s"] > 0
        assert row["cpu_hours"] == pytest.approx(row["wall_s"] / 3600 * 2 * 0.5)
        if row["status"] == "finished":
            assert metrics[-1]["step"] == 6 and (run_dir / "summary.json").is_file()
            final = json.loads((run_dir / TRIAL_FILE).read_text())["final"]
            assert final["loss"] == row["loss"]
    losses = [r["loss"] for r in rows]
    assert losses == sorted(losses)

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["trial"] for t in table] == [r["trial"] for r in rows]
    assert [float(t["loss"]) for t in table] == pytest.approx(losses)
    md = (out / "results.md").read_text()
    assert all(r["trial"] in md for r in rows) and "images_per_s" in md

    best = min((r for r in rows if r["status"] == "finished"), key=lambda r: r["loss"])
    assert f"best: trial {best['trial']}" in md
    best_exp = load_experiment(out / "best.yaml").to_dict()
    trial_exp = load_experiment(Path(best["run_dir"]) / "config.yaml").to_dict()
    assert best_exp["name"] == "t_best" and best_exp["output"]["name"] is None
    for section in ("name", "output"):
        best_exp.pop(section), trial_exp.pop(section)
    assert best_exp == trial_exp

    # ASHA stopped trials mid-run: each one's run was aborted, not left holding its workers'
    # placement group (on 2 CPUs a leaked group would have starved the next trial's data).
    assert _live_placement_groups() == []

    for picture in (
        "metric_vs_objective_masking_strategy.png",
        "metric_vs_objective_masking_ratio.png",
        "metric_vs_objective_masking_inside_ratio.png",
        "metric_vs_cost.png",
    ):
        assert (out / "plots" / picture).stat().st_size > 5_000, picture


@pytest.mark.ray
def test_killed_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    """The driver runs in its own process on the test's Ray; it is killed once the first trial
    has finished, then `--resume` completes the sweep without running that trial again.
    Trials are ranked by the frozen-encoder yardstick measured after training."""
    path = write_sweep(
        tmp_path,
        {"objective.masking.strategy": {"grid": ["random", "context_aware"]}},
        scheduler={"name": "none"},
        metric="retrieval_precision",
        mode="max",
        probe={"labels": ["label_*"], "seeds": 1, "max_epochs": 5, "retrieval_k": 5},
    )
    address = ray_cluster.get_runtime_context().gcs_address
    sets = [a for s in TINY for a in ("--set", s)]
    args = ["sweep", str(path), "--profile", "smoke", *sets, "--out", str(tmp_path)]
    args += ["--address", address]
    driver = subprocess.Popen(
        [sys.executable, "-c", f"from raydiology.cli import app; app({args!r})"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 420
        while not _finished_trials(tmp_path):
            assert driver.poll() is None, "the sweep driver exited before a trial finished"
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(1)
        time.sleep(6)  # Tune saves its state every 2 s (TUNE_GLOBAL_CHECKPOINT_S)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    sweep_dir = tmp_path / "t"  # one folder per sweep, named after it
    (first,) = _finished_trials(tmp_path)
    first_rows = len(read_metrics(first))
    first_summary = (first / "summary.json").read_text()

    # The same sweep again (as a retried RayJob would run it) resumes its folder by itself.
    out = Console(record=True, width=200)
    again = make_plan(path, profile="smoke", sets=TINY, sweep_dir=sweep_dir)
    rows = run_sweep(again, console=out)
    assert f"resuming the sweep in {sweep_dir}" in out.export_text()

    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows), rows
    assert len(read_metrics(first)) == first_rows  # not trained again
    assert (first / "summary.json").read_text() == first_summary
    assert json.loads((first / TRIAL_FILE).read_text())["attempts"] == 1
    assert (sweep_dir / "results.md").is_file() and (sweep_dir / "best.yaml").is_file()
    for row in rows:  # the yardstick's figures, as its own files in the trial's run record them
        run_dir = Path(row["run_dir"])
        retrieval = json.loads((run_dir / "retrieval.json").read_text())
        assert row["retrieval_precision"] == pytest.approx(retrieval["precision"]["5"])
        assert 0.0 <= row["retrieval_precision"] <= 1.0 and 0.0 <= row["probe_auroc"] <= 1.0
    values = [r["retrieval_precision"] for r in rows]
    assert values == sorted(values, reverse=True)  # mode max: best first


def _finished_trials(folder: Path) -> list[Path]:
    """Run directories of trials whose driver wrote its final metrics (after the yardstick)."""
    done = []
    for path in folder.glob(f"t/trials/*/{TRIAL_FILE}"):
        try:
            if "final" in json.loads(path.read_text()):
                done.append(path.parent)
        except ValueError:  # caught mid-write
            pass
    return done


def _live_placement_groups(wait_s: float = 15.0) -> list[dict]:
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + wait_s
    while True:
        live = [p for p in placement_group_table().values() if p["state"] != "REMOVED"]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.5)
