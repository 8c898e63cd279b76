"""Validation while training, without Ray: the selection metrics agree with `nlg_scores`,
rows gathered over a real 2-process gloo group score the same on every rank, the report SFT
objective's validation rows, and the config switches. The Ray run that validates is the
smoke SFT in tests/test_report_sft.py."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from raydiology.config import load_experiment
from raydiology.config_base import ConfigError, from_dict
from raydiology.evaluation.nlg import METRICS
from raydiology.models.report_generator import ReportGeneratorConfig, build_report_generator
from raydiology.objectives.report_sft import (
    ReportSFTConfig,
    SelectionSettings,
    build_report_sft,
)
from raydiology.train.validation import (
    IN_PROCESS,
    gather_scores,
    score_reports,
    score_rows,
    selection_of,
    validation_data,
)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
R2GENGPT = EXPERIMENTS / "r2gengpt.yaml"

REFERENCES = [
    "the heart is enlarged . there is a small left pleural effusion .",
    "the lungs are clear . no pleural effusion or pneumothorax .",
    "there is a right lower lobe consolidation . the heart size is normal .",
    "no acute cardiopulmonary process .",
]
PREDICTIONS = [
    "the heart is enlarged . there is a left pleural effusion .",
    "the lungs are clear . no pneumothorax .",
    "the heart size is normal . the lungs are clear .",
    "no acute cardiopulmonary process .",
]


def test_selection_metrics_are_nlg_scores_without_meteor():
    fast = score_reports(REFERENCES, PREDICTIONS)
    # asking for METEOR scores everything, as `raydiology eval` does (one JVM)
    full = score_reports(REFERENCES, PREDICTIONS, ["METEOR", "BLEU_4"])
    assert set(fast) == set(IN_PROCESS) and set(full) == set(METRICS)
    for name in IN_PROCESS:
        assert fast[name] == pytest.approx(full[name], abs=1e-12), name
    assert 0 < fast["BLEU_4"] < 1 and fast["CIDEr"] > 0


def test_score_rows_weights_the_selection_mix():
    rows = [{"reference": r, "prediction": p} for r, p in zip(REFERENCES, PREDICTIONS, strict=True)]
    mamba = SelectionSettings()  # 0.8 BLEU-4 + 0.2 CIDEr
    metrics = score_rows(rows, mamba)
    assert metrics["val_reports"] == 4
    expected = 0.8 * metrics["val_BLEU_4"] + 0.2 * metrics["val_CIDEr"]
    assert metrics["val_score"] == pytest.approx(expected)
    r2gen = SelectionSettings(weights={"BLEU_4": 0.5, "CIDEr": 0.5})
    half = score_rows(rows, r2gen)["val_score"]
    assert half == pytest.approx(0.5 * metrics["val_BLEU_4"] + 0.5 * metrics["val_CIDEr"])
    with pytest.raises(ValueError, match="split 'val'"):
        score_rows([], mamba)


# ----------------------------------------------------------------------------- 2 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, parts, out) -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # forked from a test process that had a group of its own
        dist.destroy_process_group()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        selection = SelectionSettings(weights={"BLEU_4": 0.5, "CIDEr": 0.5})
        metrics, rows = gather_scores(parts[rank], selection)
        try:
            gather_scores([], selection)  # no rows anywhere: every rank fails, none hangs
            error = None
        except RuntimeError as e:
            error = str(e)
        out.put((rank, metrics, rows, error))
    finally:
        dist.destroy_process_group()


def test_gather_scores_over_two_ranks_gives_every_rank_rank0s_numbers():
    rows = [{"reference": r, "prediction": p} for r, p in zip(REFERENCES, PREDICTIONS, strict=True)]
    parts = [rows[:3], rows[3:]]  # unequal on purpose
    context = mp.get_context("fork")  # spawn would re-import torch: seconds per process
    out, port = context.Queue(), _free_port()
    processes = [
        context.Process(target=_gather_worker, args=(rank, 2, port, parts, out)) for rank in (0, 1)
    ]
    for p in processes:
        p.start()
    results = sorted(out.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=30)
        assert p.exitcode == 0
    (_, metrics0, rows0, error0), (_, metrics1, rows1, error1) = results
    expected = score_rows(rows, SelectionSettings(weights={"BLEU_4": 0.5, "CIDEr": 0.5}))
    assert metrics0 == metrics1 == expected
    assert rows0 == rows and rows1 == []
    assert error0 == error1 and "no validation reports" in error0


# ----------------------------------------------------------------------------- objective


def test_report_sft_validation_rows_pair_prepared_references_with_generations():
    cfg = from_dict(ReportGeneratorConfig, {"flavor": "tiny"}, "model")
    torch.manual_seed(0)
    model = build_report_generator(cfg, image_size=64, in_chans=1)
    settings = {"generation": {"num_beams": 1, "min_new_tokens": 2, "max_new_tokens": 6}}
    objective = build_report_sft(from_dict(ReportSFTConfig, settings, "objective"), model=model)
    objective.train()
    batch = {"image": torch.randn(2, 1, 64, 64), "report": ["Heart is NORMAL.", None]}
    rows = objective.validation_rows(batch)
    assert objective.training  # generation leaves the training mode as it was
    assert [r["reference"] for r in rows] == [
        model.tokenizer.prepare("Heart is NORMAL."),
        model.tokenizer.prepare(""),
    ]
    assert [r["prediction"] for r in rows] == objective.generate(batch["image"])
    assert objective.validation_batch_size == 16


def test_validation_is_switched_by_eval_every_and_reads_the_selection_split():
    exp = load_experiment(R2GENGPT, profile="sft_smoke")
    assert exp.train.eval_every == 12
    selection = selection_of(exp)
    assert selection is not None and selection.weights == {"BLEU_4": 0.5, "CIDEr": 0.5}
    data = validation_data(exp)
    assert data.splits == ("val",) and data.shuffle_seed is None
    assert (data.resolution, data.channels) == (exp.data.resolution, exp.data.channels)
    assert exp.data.splits == ("train",)  # the training data is untouched

    assert load_experiment(R2GENGPT).train.eval_every == 2000  # paper-sized
    off = load_experiment(R2GENGPT, profile="sft_smoke", overrides=["train.eval_every=0"])
    assert selection_of(off) is None
    with pytest.raises(ValueError, match="validation is off"):
        validation_data(off)
    # objectives without selection settings never validate
    mae = load_experiment(
        EXPERIMENTS / "hd_mae_cam.yaml", profile="smoke", overrides=["train.eval_every=5"]
    )
    assert selection_of(mae) is None


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        load_experiment(R2GENGPT, profile="sft_smoke", overrides=["train.eval_every=-1"])
    assert err.value.key == "train.eval_every"
    with pytest.raises(ConfigError) as err:
        from_dict(ReportSFTConfig, {"selection": {"weights": {"BLEU4": 1.0}}}, "objective")
    assert err.value.key == "objective.selection.weights"


# ----------------------------------------------------------------------------- summary


def test_summary_exports_the_best_checkpoint_not_the_last(tmp_path):
    """Ray's result as `trainer.fit()` returns it, with real checkpoint folders: the export
    comes from the best val_score (here the earlier one), the picture from the last."""
    from ray.train import Checkpoint, Result
    from rich.console import Console

    from raydiology.train.launch import _summarise

    def checkpoint(name: str, *, picture: bool) -> Checkpoint:
        folder = tmp_path / name
        (folder / "export").mkdir(parents=True)
        (folder / "export" / "encoder.json").write_text(name)
        if picture:
            (folder / "reconstruction.png").write_bytes(b"png")
        return Checkpoint.from_directory(str(folder))

    early, tie, last = (checkpoint(n, picture=n == "c3") for n in ("c1", "c2", "c3"))
    scores = {"step": 10, "loss": 2.0, "val_BLEU_4": 0.3, "val_CIDEr": 0.5, "val_score": 0.4}
    best = [(early, scores), (tie, {**scores, "step": 20}), (last, {**scores, "step": 30})]
    best[2][1]["val_score"] = 0.1
    result = Result(
        metrics=best[2][1], checkpoint=last, error=None, path=str(tmp_path), best_checkpoints=best
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = _summarise(result, run_dir, Console(quiet=True), select=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    # a tie goes to the later step, as Ray ranks ties
    assert summary["selected"] == {"step": 20, "checkpoint": tie.path, **{
        k: v for k, v in scores.items() if k.startswith("val_")}}  # fmt: skip
    assert (run_dir / "export" / "encoder.json").read_text() == "c2"
    assert run.checkpoint == last.path and summary["metrics"]["step"] == 30
    assert (run_dir / "reconstruction.png").is_file()
    # without selection (other objectives): the last checkpoint's export, no "selected"
    _summarise(result, run_dir, Console(quiet=True))
    assert (run_dir / "export" / "encoder.json").read_text() == "c3"
    assert "selected" not in json.loads((run_dir / "summary.json").read_text())
