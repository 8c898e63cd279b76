"""Evaluation protocols: the presets and where they come from, R2GenGPT's MIMIC cleaning,
references cut as R2Gen and R2GenGPT cut them, the protocol recorded in every metrics JSON,
and CE from labels CSVs any labeler made (`raydiology eval --labels-ref/--labels-pred`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.config import load_experiment
from raydiology.config_base import ConfigError
from raydiology.data.reports import clean_report
from raydiology.data.tokenizers import TokenizerConfig, build_tokenizer
from raydiology.evaluation.clinical import ce_scores
from raydiology.evaluation.labeler import OBSERVATIONS, label_reports
from raydiology.evaluation.protocol import PRESETS, check_truncation, get_protocol, reference_text

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PAIRS = [
    ("the heart is enlarged . small left pleural effusion .", "cardiomegaly . no effusion ."),
    ("no acute cardiopulmonary abnormality .", "no acute disease ."),
    ("possible right lower lobe pneumonia .", "the lungs are clear ."),
    ("there is a small right pneumothorax .", "small right pneumothorax ."),
]


def test_presets_say_where_their_choices_come_from_and_experiments_name_theirs():
    assert set(PRESETS) == {"raydiology", "r2gen-iu", "r2gen-mimic", "r2gengpt-mimic", "cxpmrg"}
    for name, protocol in PRESETS.items():
        assert protocol.name == name and protocol.source, name
        check_truncation(protocol.reference_truncation)
    assert PRESETS["r2gen-iu"].column == "findings" and PRESETS["raydiology"].column == "report"
    assert PRESETS["r2gen-iu"].reference_truncation == "words:60"  # train_iu_xray.sh
    assert PRESETS["r2gen-mimic"].reference_truncation == "words:100"  # train_mimic_cxr.sh
    assert PRESETS["r2gengpt-mimic"].reference_truncation == "llm:100"  # configs/config.py
    expected = {"r2gengpt.yaml": "r2gengpt-mimic", "mambaxray_vl/stage3_sft.yaml": "cxpmrg"}
    for path, name in expected.items():
        exp = load_experiment(EXPERIMENTS / path)
        assert exp.evaluation.protocol == name
        # trained on the section it is scored on, cleaned as the protocol cleans
        assert exp.objective.config.report_column == PRESETS[name].column
        assert exp.model.config.tokenizer_config().clean == PRESETS[name].clean
    with pytest.raises(ConfigError, match=r"evaluation\.protocol"):
        load_experiment(EXPERIMENTS / "r2gengpt.yaml", overrides=["evaluation.protocol=coco"])
    with pytest.raises(ValueError, match="unknown evaluation protocol 'coco'"):
        get_protocol("coco")
    with pytest.raises(ValueError, match="words:N"):
        check_truncation("words:0")


def test_r2gengpt_mimic_cleaning_keeps_colons_where_r2gen_drops_them():
    text = "FINDINGS:\nHeart size <normal> @ baseline..  1. No effusion.\n2. Lines: none."
    assert clean_report(text, style="mimic") == (
        "findings heart size normal  baseline . no effusion . lines none ."
    )
    assert clean_report(text, style="r2gengpt-mimic") == (
        "findings : heart size <normal> @ baseline . no effusion . lines : none ."
    )
    # IU cleaning keeps the newline (the 7B recipes used it on MIMIC text before)
    assert "\n" in clean_report(text, style="iu")


def test_references_cut_as_r2gen_and_r2gengpt_cut_them(tmp_path):
    corpus = tmp_path / "reports.txt"
    corpus.write_text("the heart is normal . the lungs are clear .\n" * 3 + "rare words once .\n")
    words = build_tokenizer(TokenizerConfig(kind="word", train_reports=str(corpus), min_freq=3))
    report = "The heart is enlarged. The lungs are clear."
    # R2Gen: max_seq_length ids including its BOS -> 4 words; words under the threshold: <unk>
    r2gen = PRESETS["r2gen-iu"].with_changes(reference_truncation="words:5")
    assert reference_text(report, r2gen, words) == "the heart is <unk>"
    assert r2gen.name == "r2gen-iu+custom" and r2gen.source == ""
    whole = PRESETS["r2gen-iu"]  # 59 words: this report is whole, IU-cleaned
    assert reference_text(report, whole, words) == "the heart is <unk> . the lungs are clear ."
    # R2GenGPT: the first N tokens of the model's own tokenizer, decoded
    pieces = build_tokenizer(TokenizerConfig(kind="wordpiece", train_reports=str(corpus),
                                             vocab_size=60, min_freq=1))  # fmt: skip
    llm = PRESETS["r2gengpt-mimic"].with_changes(reference_truncation="llm:3")
    cleaned = clean_report(report, style="r2gengpt-mimic")
    first3 = pieces.hf.decode(pieces.hf.encode(cleaned, add_special_tokens=False)[:3])
    assert reference_text(report, llm, pieces) == first3.strip() and first3.strip()
    # the default: the report as the run's tokenizer prepares it
    assert reference_text(report, PRESETS["raydiology"], words) == words.prepare(report)


def _chexpert_csv(path: Path, texts: list[str]) -> list[dict]:
    """Labels as the CheXpert labeler writes them: 'Reports' first, floats, blanks."""
    labels = label_reports(texts)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Reports", *OBSERVATIONS])
        for text, row in zip(texts, labels, strict=True):
            writer.writerow(
                [text, *("" if row[o] is None else f"{row[o]:.1f}" for o in OBSERVATIONS)]
            )
    return labels


def test_ce_from_any_labelers_csvs_and_the_protocol_recorded(tmp_path):
    predictions = tmp_path / "eval" / "predictions.jsonl"
    predictions.parent.mkdir()
    records = [{"id": f"s{i}", "reference": r, "prediction": p} for i, (r, p) in enumerate(PAIRS)]
    predictions.write_text("".join(json.dumps(r) + "\n" for r in records))
    # what `raydiology generate` records: the protocol its references were built by
    (predictions.parent / "run.json").write_text(
        json.dumps({"protocol": PRESETS["r2gen-iu"].describe()})
    )
    ref_labels = _chexpert_csv(tmp_path / "gts_labeled.csv", [r for r, _ in PAIRS])
    pred_labels = _chexpert_csv(tmp_path / "res_labeled.csv", [p for _, p in PAIRS])
    runner = CliRunner()
    out = tmp_path / "chexpert.json"
    ran = runner.invoke(app, ["eval", str(predictions), "--out", str(out),
                              "--labels-ref", str(tmp_path / "gts_labeled.csv"),
                              "--labels-pred", str(tmp_path / "res_labeled.csv")])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    metrics = json.loads(out.read_text())
    expected = ce_scores(pred_labels, ref_labels)
    assert metrics["ce_f1_micro"] == pytest.approx(expected["ce_f1_micro"])
    assert expected["ce_f1_micro"] > 0
    assert metrics["labeler"] == "chexpert-labeler" and metrics["ce_matched_by"] == "order"
    assert metrics["protocol"]["name"] == "r2gen-iu" and metrics["ce_labeler_matches_protocol"]

    # the same labels made by `raydiology label` (ids first, a sidecar naming the labeler),
    # with PTB switched on here: the protocol is then no longer the preset, and says so
    for side in ("reference", "prediction"):
        listing = tmp_path / f"{side}.jsonl"
        listing.write_text("".join(json.dumps({"id": r["id"], "report": r[side]}) + "\n"
                                   for r in reversed(records)))  # fmt: skip
        made = runner.invoke(app, ["label", str(listing), "--out", str(tmp_path / f"{side}.csv")])
        assert made.exit_code == 0, made.output
    out = tmp_path / "rules.json"
    ran = runner.invoke(app, ["eval", str(predictions), "--out", str(out), "--ptb",
                              "--labels-ref", str(tmp_path / "reference.csv"),
                              "--labels-pred", str(tmp_path / "prediction.csv")])  # fmt: skip
    assert ran.exit_code == 0, ran.output
    metrics = json.loads(out.read_text())
    assert metrics["ce_matched_by"] == "id" and metrics["labeler"] == "raydiology-rules"
    assert metrics["ce_f1_micro"] == pytest.approx(expected["ce_f1_micro"])  # same labels
    assert metrics["protocol"]["name"] == "r2gen-iu+custom" and metrics["ptb_tokenizer"] is True
    assert metrics["ce_labeler_matches_protocol"] is False  # r2gen-iu's papers: CheXpert

    # bad input names the file; the two options go together
    short = tmp_path / "short.csv"
    short.write_text((tmp_path / "gts_labeled.csv").read_text().rsplit("\n", 2)[0] + "\n")
    ran = runner.invoke(app, ["eval", str(predictions), "--labels-ref", str(short),
                              "--labels-pred", str(tmp_path / "res_labeled.csv")])  # fmt: skip
    said = " ".join(ran.output.split())  # the console wraps long lines
    assert ran.exit_code == 2 and "short.csv: 3 label rows for 4 predictions" in said
    ran = runner.invoke(app, ["eval", str(predictions), "--labels-ref", str(short)])
    assert ran.exit_code == 2 and "go together" in ran.output
    bad = tmp_path / "bad.csv"
    bad.write_text("Reports," + ",".join(OBSERVATIONS) + "\nx," + "2," * 13 + "\n")
    ran = runner.invoke(app, ["eval", str(predictions), "--labels-ref", str(bad),
                              "--labels-pred", str(bad)])  # fmt: skip
    assert ran.exit_code == 2 and "bad.csv: line 2: No Finding = '2'" in " ".join(
        ran.output.split()
    )
