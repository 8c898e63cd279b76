"""End to end on a real local Ray: `raydiology run ... --profile smoke` trains with two
DeepSpeed ZeRO-2 workers, checkpoints, exports, draws, and resumes; the README's first
command draws a reconstruction that shows learning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import raydiology
from raydiology.cli import app
from raydiology.train.launch import read_metrics

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = str(REPO / "experiments" / "hd_mae_cam.yaml")


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def smoke_run(
    out: Path, *sets: str, allow: str = "", experiment: str = EXPERIMENT, profile: str = "smoke"
) -> Path:
    args = ["run", experiment, "--profile", profile, "--set", f"output.dir={out}"]
    for s in sets:
        args += ["--set", s]
    if allow:  # settings a rerun may change (`--allow-changes`)
        args += ["--allow-changes", allow]
    output = run_cli(*args)
    assert "encoder export" in output and "picture" in output
    name = next((s.split("=", 1)[1] for s in sets if s.startswith("output.name=")), "hd_mae_cam")
    return out / name


def assert_learned(run_dir: Path) -> list[dict]:
    rows = read_metrics(run_dir)
    losses = [r["loss"] for r in rows]
    assert len(losses) >= 4, rows
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first, f"loss did not go down: {losses}"
    return rows


def assert_export_matches_checkpoint(run_dir: Path) -> None:
    """The exported encoder equals the trained weights in the final DeepSpeed checkpoint."""
    from raydiology.config import experiment_from_dict
    from raydiology.registry import build_model, build_objective
    from raydiology.train.loop import CHECKPOINT_TAG
    from raydiology.train.safe_load import weights_only_load

    encoder = raydiology.load_encoder(run_dir / "export")
    spec = encoder.spec
    size, chans = spec["image_size"], spec["in_chans"]
    images = torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = encoder(images)
    assert features.shape[0] == 2 and features.shape[-1] == spec["embed_dim"]
    with torch.no_grad():
        assert torch.equal(features, raydiology.load_encoder(run_dir / "export")(images))

    summary = json.loads((run_dir / "summary.json").read_text())
    exp = experiment_from_dict(__import__("yaml").safe_load((run_dir / "config.yaml").read_text()))
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    states = weights_only_load(
        str(Path(summary["checkpoint"]) / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    )
    objective.load_state_dict(states["module"])
    with torch.no_grad():
        assert torch.allclose(objective.encoder.eval()(images), features, atol=1e-5)


def readme_first_run() -> tuple[str, str]:
    """(experiment, profile) of the README's first `raydiology run` command."""
    readme = (REPO / "README.md").read_text()
    found = re.search(r"raydiology run (\S+\.yaml) --profile (\w+)", readme)
    assert found, "the README's first command is no `raydiology run FILE --profile NAME`"
    return str(REPO / found[1]), found[2]


def masked_mse_and_mean_mse(arrays) -> tuple[float, float]:
    """Squared error over the picture's masked pixels: the model's, and that of predicting
    each image's mean there."""
    image, prediction = arrays["image"], arrays["prediction"]
    mask = np.broadcast_to(arrays["mask"] > 0.5, image.shape)
    errors, baseline = [], []
    for x, pred, m in zip(image, prediction, mask, strict=True):
        errors.append((pred[m] - x[m]) ** 2)
        baseline.append((x[m] - x[m].mean()) ** 2)
    return float(np.concatenate(errors).mean()), float(np.concatenate(baseline).mean())


def test_readme_first_run_trains_exports_and_draws_what_it_learned(ray_cluster, tmp_path):
    experiment, profile = readme_first_run()
    run_dir = smoke_run(tmp_path, experiment=experiment, profile=profile)
    rows = assert_learned(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows[-1]["step"] == summary["metrics"]["step"] >= 24
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "reconstruction.png").stat().st_size > 10_000
    # The picture's masked patches resemble the images: 0.17 of the mean's error measured
    # after the quickstart's 800 steps (noise after smoke's 24 steps: 1.2, measured Ray-free).
    mse, mean_mse = masked_mse_and_mean_mse(np.load(run_dir / "reconstruction.npz"))
    assert mse < 0.5 * mean_mse, (mse, mean_mse)
    assert mse == pytest.approx(summary["metrics"]["picture_masked_mse"], rel=1e-4)
    assert Path(summary["checkpoint"]).is_dir()
    assert_export_matches_checkpoint(run_dir)
    spec = json.loads((run_dir / "export" / "encoder.json").read_text())
    assert spec["objective"]["masking"]["strategy"] == "context_aware"
    assert len(spec["corpus_manifest_sha256"]) == 64 and len(spec["config_sha256"]) == 64


def test_smoke_run_on_ingested_real_radiographs(ray_cluster, tmp_path, hannover_png):
    from raydiology.data.ingest import ingest_images

    subset = tmp_path / "png"
    subset.mkdir()
    for path in sorted(hannover_png.glob("*.png"))[:48]:
        (subset / path.name).symlink_to(path)
    corpus = tmp_path / "corpus"
    credit = "COVID-19 Image Repository, Hannover Medical School (CC BY 3.0)"
    summary = ingest_images([subset], corpus, size=128, attribution=credit, progress=False)
    assert summary.ingested == 48 and summary.manifest.made_by["attribution"] == credit
    run_dir = smoke_run(
        tmp_path / "runs",
        f"data.corpus={corpus}",
        "train.max_steps=16",
        "train.checkpoint_every=16",
    )
    assert_learned(run_dir)
    assert_export_matches_checkpoint(run_dir)
    assert (run_dir / "reconstruction.png").is_file()


def test_rerun_with_same_name_resumes_from_latest_checkpoint(ray_cluster, tmp_path):
    # grad_accum=2: steps count optimizer steps, two micro-batches each
    sets = (
        "output.name=resume",
        "train.log_every=1",
        "train.checkpoint_every=4",
        "train.grad_accum=2",
    )
    run_dir = smoke_run(tmp_path, *sets, "train.max_steps=4")
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    # A longer budget is a changed setting: refused unless allowed, the run left as it was.
    base = ["run", EXPERIMENT, "--profile", "smoke", "--set", f"output.dir={tmp_path}"]
    for s in (*sets, "train.max_steps=8"):
        base += ["--set", s]
    refused = CliRunner().invoke(app, base)
    assert refused.exit_code == 2 and "train.max_steps: 4 -> 8" in refused.output, refused.output
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    smoke_run(tmp_path, *sets, "train.max_steps=8", allow="train.max_steps")
    steps = [r["step"] for r in read_metrics(run_dir)]
    # The second launch continues at step 5; a restart from 0 would log 1, 2, ... again.
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8], steps
