"""The hand-annotated Open-I development set for the report labeler (issue 16).

`tests/data/openi_gold.csv` holds only report ids and labels: the report text is CC BY-NC-ND
and is read here, in place, from the Open-I archive that torchxrayvision installs, through the
project's own reader. How the labels were decided: `docs/labeler_annotation_guide.md`.

Scoring follows the maintainers' yardstick: only POSITIVE labels count; uncertain (-1), negative
(0) and not mentioned (empty) are all "not positive".

    from labeler_gold import gold_or_skip, micro_f1
    gold = gold_or_skip("dev")
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

GOLD_CSV = Path(__file__).resolve().parent / "data" / "openi_gold.csv"

OBSERVATIONS8: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Lung Lesion",
)
SPLITS = ("dev", "test")
HARD_CASE_TAGS = frozenset(
    {
        "hedged",
        "typo",
        "xxxx",
        "prior",
        "no_change",
        "without_list",
        "resolved",
        "borderline",
        "upper_normal",
    }
)
_VALUES = {"": None, "1": 1, "0": 0, "-1": -1}

Labels = Mapping[str, int | None]


class GoldUnavailable(RuntimeError):
    """The Open-I report texts cannot be read (torchxrayvision or its archive is absent)."""


@dataclass(frozen=True)
class GoldReport:
    report_id: str  # the XML file stem in NLMCXR_reports.tgz, e.g. "1234"
    split: str  # "test" when int(report_id) % 4 == 0, else "dev"
    text: str  # FINDINGS then IMPRESSION, as raydiology.data.reports.read_openi joins them
    labels: dict[str, int | None]  # 1 / 0 / -1 / None (not mentioned), per OBSERVATIONS8
    hard_cases: tuple[str, ...]


def split_of(report_id: str) -> str:
    return "test" if int(report_id) % 4 == 0 else "dev"


def _read_rows(path: Path = GOLD_CSV) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        expected = ["report_id", "split", *OBSERVATIONS8, "hard_case"]
        if reader.fieldnames != expected:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {expected}")
        rows = list(reader)
    for row in rows:
        rid = row["report_id"]
        if row["split"] != split_of(rid):
            raise ValueError(f"{path}: report {rid} is in {row['split']}, not {split_of(rid)}")
        for obs in OBSERVATIONS8:
            if row[obs] not in _VALUES:
                raise ValueError(f"{path}: report {rid}: {obs}={row[obs]!r}")
        unknown = {t for t in row["hard_case"].split(";") if t} - HARD_CASE_TAGS
        if unknown:
            raise ValueError(f"{path}: report {rid}: unknown hard_case tags {sorted(unknown)}")
    return rows


def _openi_texts() -> dict[str, str]:
    try:
        from raydiology.data.reports import default_openi_archive, read_openi

        archive = default_openi_archive()
    except (ImportError, FileNotFoundError) as e:
        raise GoldUnavailable(f"torchxrayvision's Open-I archive is not installed ({e})") from e
    return {r.study_id.removeprefix("CXR"): r.report for r in read_openi(archive)}


def load_gold(split: str | None = None) -> list[GoldReport]:
    """The annotated reports of one split ("dev", "test") or both (None), by report id.

    Raises GoldUnavailable when the report texts cannot be read; `gold_or_skip` turns that
    into a pytest skip.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, not {split!r}")
    rows = [r for r in _read_rows() if split is None or r["split"] == split]
    texts = _openi_texts()
    gold = []
    for row in rows:
        rid = row["report_id"]
        if rid not in texts:
            raise ValueError(f"{GOLD_CSV}: report {rid} is not in the Open-I archive")
        gold.append(
            GoldReport(
                report_id=rid,
                split=row["split"],
                text=texts[rid],
                labels={obs: _VALUES[row[obs]] for obs in OBSERVATIONS8},
                hard_cases=tuple(t for t in row["hard_case"].split(";") if t),
            )
        )
    return sorted(gold, key=lambda g: int(g.report_id))


def gold_or_skip(split: str | None = None) -> list[GoldReport]:
    """`load_gold`, or a pytest skip where torchxrayvision's Open-I archive is absent."""
    import pytest

    try:
        return load_gold(split)
    except GoldUnavailable as e:
        pytest.skip(f"labeler gold set: {e}; torchxrayvision's Open-I archive is not installed")


# -- scoring: positive mentions only ---------------------------------------------------------


@dataclass(frozen=True)
class Score:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def _gold_labels(gold: Sequence[GoldReport | Labels]) -> list[Labels]:
    return [g.labels if isinstance(g, GoldReport) else g for g in gold]


def per_observation(
    pred: Sequence[Labels],
    gold: Sequence[GoldReport | Labels],
    observations: Iterable[str] = OBSERVATIONS8,
) -> dict[str, Score]:
    """TP/FP/FN per observation and "micro" (summed), counting only label 1 as positive.

    `pred` and `gold` are aligned lists (one entry per report); a missing key, None, 0 and -1
    all count as not positive.
    """
    gold_labels = _gold_labels(gold)
    if len(pred) != len(gold_labels):
        raise ValueError(f"{len(pred)} predictions for {len(gold_labels)} gold reports")
    scores: dict[str, Score] = {}
    total = [0, 0, 0]
    for obs in observations:
        tp = fp = fn = 0
        for p, g in zip(pred, gold_labels, strict=True):
            p_pos, g_pos = p.get(obs) == 1, g.get(obs) == 1
            tp += p_pos and g_pos
            fp += p_pos and not g_pos
            fn += g_pos and not p_pos
        scores[obs] = Score(tp, fp, fn)
        total = [total[0] + tp, total[1] + fp, total[2] + fn]
    scores["micro"] = Score(*total)
    return scores


def micro_f1(pred: Sequence[Labels], gold: Sequence[GoldReport | Labels]) -> float:
    """Micro-averaged F1 over OBSERVATIONS8, positive mentions only."""
    return per_observation(pred, gold)["micro"].f1


def report(scores: Mapping[str, Score]) -> str:
    """A small table of precision / recall / F1 per observation, for test messages and the bench."""
    lines = [f"{'observation':18s} {'P':>6s} {'R':>6s} {'F1':>6s}  tp/fp/fn"]
    for name, s in scores.items():
        lines.append(
            f"{name:18s} {s.precision:6.3f} {s.recall:6.3f} {s.f1:6.3f}  {s.tp}/{s.fp}/{s.fn}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    # The figures: `python tests/labeler_gold.py` prints P / R / F1 per split.
    from raydiology.evaluation.labeler import label_reports

    for name in ("dev", "test"):
        reports = load_gold(name)
        print(f"{name} ({len(reports)} reports)")
        print(report(per_observation(label_reports([g.text for g in reports]), reports)))
