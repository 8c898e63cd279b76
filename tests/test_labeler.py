"""The rule-based CheXpert-style report labeler: reference samples, cues, scope, the No Finding
rule, the phantom corpus's ground truth, Open-I reports, files in and out, and speed."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.data.phantom import FINDINGS, PATHOLOGIES, make_phantom
from raydiology.evaluation import labeler_phrases
from raydiology.evaluation.labeler import (
    OBSERVATIONS,
    ReportLabeler,
    _dispatch,
    benchmark,
    label_reports,
    normalize,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "chexpert-labeler"


@pytest.fixture(scope="module")
def labeler() -> ReportLabeler:
    return ReportLabeler()


def positives(labels: dict[str, int | None]) -> dict[str, int]:
    return {k: v for k, v in labels.items() if v is not None}


# -- the CheXpert labeler's own examples -----------------------------------------------------


def test_reference_samples_exactly(labeler):
    expected_csv = REFERENCE / "labeled_reports.csv"
    if not expected_csv.is_file():
        pytest.skip(f"CheXpert reference samples not found at {expected_csv}")
    with expected_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    for row in rows:
        expected = {o: None if row[o] == "" else int(float(row[o])) for o in OBSERVATIONS}
        assert labeler.label(row["Reports"]) == expected, row["Reports"]


# -- cues and scope ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ("No pleural effusion.", {"Pleural Effusion": 0}),
        ("There is no pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0}),
        ("Pleural effusion is not seen.", {"Pleural Effusion": 0}),
        ("The previously seen effusion has resolved.", {"Pleural Effusion": 0}),
        ("Negative for pneumothorax.", {"Pneumothorax": 0}),
        ("Lungs are clear of consolidation.", {"Consolidation": 0}),
        ("Heart size is normal.", {"Cardiomegaly": 0}),
        ("Normal heart size and mediastinal contours.",
         {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0}),
        ("The cardiac silhouette is within normal limits.", {"Cardiomegaly": 0}),
    ],
)  # fmt: skip
def test_negation(labeler, report, expected):
    labels = labeler.label(report)
    assert {k: labels[k] for k in expected} == expected
    assert labels["No Finding"] == 1  # nothing is asserted, so nothing is found


@pytest.mark.parametrize(
    ("report", "observation"),
    [
        ("Left basilar opacity may represent atelectasis.", "Atelectasis"),
        ("Possible small right pleural effusion.", "Pleural Effusion"),
        ("Pneumonia cannot be excluded.", "Pneumonia"),
        ("Cannot exclude a small pneumothorax.", "Pneumothorax"),
        ("Findings are suspicious for pneumonia.", "Pneumonia"),
        ("Atelectasis versus consolidation at the left base.", "Consolidation"),
        ("Mild pulmonary vascular congestion.", "Edema"),
        ("Stable cardiomediastinal silhouette.", "Enlarged Cardiomediastinum"),
        ("Pneumonia?", "Pneumonia"),
    ],
)
def test_uncertainty(labeler, report, observation):
    labels = labeler.label(report)
    assert labels[observation] == -1
    assert labels["No Finding"] is None  # an uncertain finding is still a finding


def test_uncertainty_outranks_its_own_negation(labeler):
    # "not excluded" holds a negation word, but the finding stays possible.
    assert labeler.label("A small effusion is not excluded.")["Pleural Effusion"] == -1
    assert labeler.label("No new consolidation.")["Consolidation"] == -1  # CheXpert's rule


def test_scope_ends_at_sentence_and_contrast(labeler):
    assert positives(labeler.label("No pneumothorax. Left pleural effusion.")) == {
        "Pneumothorax": 0,
        "Pleural Effusion": 1,
    }
    assert positives(labeler.label("No pneumothorax, but there is a left pleural effusion.")) == {
        "Pneumothorax": 0,
        "Pleural Effusion": 1,
    }
    assert labeler.label("No effusion; atelectasis at the left base.")["Atelectasis"] == 1
    assert labeler.label("Possible effusion. Atelectasis.")["Atelectasis"] == 1
    # A cue after a mention does not reach across a sentence either.
    assert labeler.label("Cardiomegaly. Pneumothorax is not seen.")["Cardiomegaly"] == 1


def test_the_nearest_cue_before_a_mention_decides(labeler):
    labels = labeler.label("Possible small effusion, no pneumothorax.")
    assert (labels["Pleural Effusion"], labels["Pneumothorax"]) == (-1, 0)
    labels = labeler.label("No effusion, possible atelectasis.")
    assert (labels["Pleural Effusion"], labels["Atelectasis"]) == (0, -1)


def test_exclusions_and_positions_are_not_mentions(labeler):
    assert positives(labeler.label("Small pericardial effusion."))["No Finding"] == 1
    assert labeler.label("Small pericardial effusion.")["Pleural Effusion"] is None
    labels = labeler.label("Pacemaker leads project over the heart.")
    assert (labels["Cardiomegaly"], labels["Support Devices"]) == (None, 1)
    assert labeler.label("Massive hiatal hernia.")["Lung Lesion"] is None


def test_aggregation_positive_beats_uncertain_beats_negative(labeler):
    assert (
        labeler.label("No effusion on the right. Left pleural effusion.")["Pleural Effusion"] == 1
    )
    assert labeler.label("No right effusion. Possible left effusion.")["Pleural Effusion"] == -1
    assert labeler.label("No right effusion. No left effusion.")["Pleural Effusion"] == 0
    assert labeler.label("")["No Finding"] == 1  # nothing said: nothing found (CheXpert)


def test_no_finding_rule(labeler):
    # Support devices do not make a report abnormal ...
    labels = labeler.label("Endotracheal tube in place. No acute cardiopulmonary process.")
    assert (labels["No Finding"], labels["Support Devices"]) == (1, 1)
    # ... any other positive or uncertain observation does, also one outside the 14 columns,
    assert labeler.label("Emphysema. No effusion.")["No Finding"] is None
    assert labeler.label("Possible cardiomegaly.")["No Finding"] is None
    # ... and a negative one does not.
    assert labeler.label("No cardiomegaly or edema.")["No Finding"] == 1
    # No Finding is never negative: it is positive or blank.
    assert {lab["No Finding"] for lab in label_reports(["Cardiomegaly.", "Clear."])} == {None, 1}


def test_heart_failure_makes_cardiomegaly_uncertain(labeler):
    labels = labeler.label("Findings consistent with CHF.")
    assert (labels["Edema"], labels["Cardiomegaly"]) == (1, -1)


def test_normalize_reads_slashes_and_paragraphs():
    assert normalize("Atelectasis/pneumonia\n\nNo  effusion w/o change") == (
        "atelectasis or pneumonia . no effusion without change"
    )


def test_dispatched_regex_matches_plain_alternation():
    """The first-letter factoring is an optimisation only: same matches as a plain '|'."""
    texts = [normalize(make_phantom(np.random.default_rng([5, i]), size=16).report)
             for i in range(60)]  # fmt: skip
    texts += [normalize(t) for t in SAMPLE_TEXTS]
    for fragments, tail in (
        ([*labeler_phrases.SKIPS, *(f for f, _, _ in labeler_phrases.MENTIONS)], ""),
        ([f for f, *_ in labeler_phrases.CUES if not f.startswith("\\?")], r"(?!\w)"),
    ):
        fast = re.compile(r"\b(?:" + _dispatch(fragments) + ")" + tail)
        plain = re.compile(r"\b(?:" + "|".join(f"(?:{f})" for f in fragments) + ")" + tail)
        for text in texts:
            assert [m.span() for m in fast.finditer(text)] == [
                m.span() for m in plain.finditer(text)
            ]


SAMPLE_TEXTS = [
    "The heart size and mediastinal contours are within normal limits. No focal airspace "
    "disease, pleural effusion or pneumothorax. Degenerative changes of the spine.",
    "Stable cardiomegaly with pulmonary vascular congestion; cannot exclude early edema. "
    "Left PICC line tip in the SVC. Calcified granuloma. Hyperexpanded lungs.",
    "1. Left lower lobe consolidation, possibly pneumonia. 2. Small left effusion.",
]


# -- phantom corpus: the labels the SFT will be scored with -----------------------------------

PHANTOM_COLUMNS = {
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "lung_lesion": "Lung Lesion",
    "support_devices": "Support Devices",
}


def test_phantom_reports_match_ground_truth(labeler):
    assert set(PHANTOM_COLUMNS) == set(FINDINGS)
    cases = [
        make_phantom(np.random.default_rng([0, i]), size=16, finding_prob=p)
        for i in range(160)
        for p in (0.15, 0.6)
    ]
    seen = {name: set() for name in FINDINGS}
    for case in cases:
        labels = labeler.label(case.report)
        for name, column in PHANTOM_COLUMNS.items():
            assert (labels[column] == 1) == case.findings[name], (name, case.report)
            assert labels[column] != -1, case.report  # the templates never hedge
            seen[name].add(case.findings[name])
        no_finding = not any(case.findings[k] for k in PATHOLOGIES)
        assert (labels["No Finding"] == 1) == no_finding, case.report
        others = {k for k, v in labels.items() if v in (1, -1)}
        assert others <= {"No Finding", *PHANTOM_COLUMNS.values()}, case.report
    assert all(v == {True, False} for v in seen.values())  # both states of every finding ran


# -- Open-I reports (torchxrayvision's bundled archive) ---------------------------------------


def test_openi_reports(labeler):
    if importlib.util.find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision is not installed: no Open-I report archive to read")
    from raydiology.data.reports import read_openi

    records = [r for r in read_openi() if r.report]
    assert len(records) > 3000
    labels = labeler.label_many([r.report for r in records])
    assert all(set(lab) == set(OBSERVATIONS) for lab in labels)
    # Open-I's MeSH annotation says "normal" for a normal study: those should mostly come out
    # as No Finding, and studies with MeSH findings mostly not.
    normal = [
        lab
        for r, lab in zip(records, labels, strict=True)
        if r.labels.get("mesh", "").lower() == "normal"
    ]
    abnormal = [lab for r, lab in zip(records, labels, strict=True)
                if r.labels.get("mesh") and r.labels["mesh"].lower() != "normal"]  # fmt: skip
    assert len(normal) > 1000 and len(abnormal) > 1000
    assert sum(lab["No Finding"] == 1 for lab in normal) / len(normal) > 0.85
    assert sum(lab["No Finding"] == 1 for lab in abnormal) / len(abnormal) < 0.3
    # Every observation occurs, and cardiomegaly in plausible numbers.
    for observation in OBSERVATIONS:
        assert any(lab[observation] == 1 for lab in labels), observation
    cardiomegaly = [r for r, lab in zip(records, labels, strict=True) if lab["Cardiomegaly"] == 1]
    mesh = [r for r in cardiomegaly if "cardiomegaly" in r.labels.get("mesh", "").lower()]
    assert len(mesh) / len(cardiomegaly) > 0.5


# -- files ---------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_label_cli_csv_with_ids(tmp_path):
    source = tmp_path / "reports.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "report"])
        writer.writerow(["s1", "No pleural effusion. Possible atelectasis."])
        writer.writerow(["s2", "Cardiomegaly, with a small right effusion."])
    out = tmp_path / "labels.csv"
    result = CliRunner().invoke(app, ["label", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert rows[0] == ["id", *OBSERVATIONS]
    first = dict(zip(rows[0], rows[1], strict=True))
    assert first["id"] == "s1"
    assert (first["Pleural Effusion"], first["Atelectasis"], first["No Finding"]) == ("0", "-1", "")
    assert first["Edema"] == ""  # not mentioned
    second = dict(zip(rows[0], rows[2], strict=True))
    assert (second["id"], second["Cardiomegaly"], second["Pleural Effusion"]) == ("s2", "1", "1")


def test_label_cli_headerless_csv_like_chexpert(tmp_path):
    sample = REFERENCE / "sample_reports.csv"
    if not sample.is_file():
        pytest.skip(f"CheXpert reference samples not found at {sample}")
    out = tmp_path / "labels.csv"
    result = CliRunner().invoke(app, ["label", str(sample), "--out", str(out)])
    assert result.exit_code == 0, result.output
    ours = read_csv(out)
    theirs = read_csv(REFERENCE / "labeled_reports.csv")
    assert ours[0] == theirs[0]  # "Reports" + the 14 observations, same order
    assert len(ours) == len(theirs) == 5
    for mine, ref in zip(ours[1:], theirs[1:], strict=True):
        assert mine[0] == ref[0]  # the report text itself
        assert [float(v) if v else None for v in mine[1:]] == [
            float(v) if v else None for v in ref[1:]
        ]


def test_label_cli_jsonl(tmp_path):
    source = tmp_path / "reports.jsonl"
    source.write_text(
        "\n".join(json.dumps({"id": i, "report": t}) for i, t in enumerate(SAMPLE_TEXTS)) + "\n"
    )
    out = tmp_path / "labels.csv"
    assert CliRunner().invoke(app, ["label", str(source), "--out", str(out)]).exit_code == 0
    rows = read_csv(out)
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    assert dict(zip(rows[0], rows[3], strict=True))["Consolidation"] == "1"
    assert dict(zip(rows[0], rows[3], strict=True))["Pneumonia"] == "-1"


def test_label_cli_rejects_bad_jsonl(tmp_path):
    source = tmp_path / "reports.jsonl"
    source.write_text('{"id": 1, "text": "no report key"}\n')
    result = CliRunner().invoke(app, ["label", str(source), "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2
    assert "line 1" in result.output


# -- speed -------------------------------------------------------------------------------------


def test_benchmark_reports_a_rate():
    reports = [make_phantom(np.random.default_rng([1, i]), size=16).report for i in range(100)]
    result = benchmark(reports * 5, repeats=3)
    assert result["reports"] == 500 and result["repeats"] == 3
    # Loose floor (CPU time, so a busy machine does not fail it); the target is 2,000/s.
    assert result["reports_per_s"] > 500
