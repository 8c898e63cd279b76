"""Score generated reports: NLG metrics and clinical efficacy in one JSON object.

Input: JSON Lines, one object per report with `id`, `reference` and `prediction` (texts);
other keys are ignored. Output (also written next to the input as `<name>.metrics.json`):

    {"n": 590, "ptb_tokenizer": false, "BLEU_1": ..., "BLEU_4": ..., "METEOR": ...,
     "ROUGE_L": ..., "CIDEr": ..., "ce_precision_micro": ..., "ce_recall_micro": ...,
     "ce_f1_micro": ..., "ce_*_macro": ..., "ce_uncertain_as": "negative",
     "ce_per_observation": {"Cardiomegaly": {"precision": ..., ...}, ...},
     "labeler": "raydiology-rules"}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from raydiology.evaluation.clinical import UncertainAs, ce_scores
from raydiology.evaluation.labeler import Label, default_labeler
from raydiology.evaluation.nlg import nlg_scores

REQUIRED = ("id", "reference", "prediction")
LABELER_NAME = "raydiology-rules"  # the built-in labeler's name, as recorded in results


class ReportsLabeler(Protocol):
    """What CE needs of a labeler: a name for the record and batch labeling."""

    name: str

    def label_many(self, reports: Iterable[str]) -> list[dict[str, Label]]: ...


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a predictions JSONL file, checked: errors name the line."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number}: invalid JSON: {e.msg}") from e
            records.append(_check(record, f"{path}: line {number}"))
    if not records:
        raise ValueError(f"{path}: no predictions")
    return records


def _check(record: object, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))}")
    for key in ("reference", "prediction"):
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string")
    return record


def metrics_path(predictions: str | os.PathLike) -> Path:
    """`run/preds.jsonl` -> `run/preds.metrics.json`."""
    path = Path(predictions)
    return path.with_name(path.name.removesuffix(".jsonl").removesuffix(".json") + ".metrics.json")


def evaluate_predictions(
    predictions: str | os.PathLike | Iterable[Mapping[str, Any]],
    *,
    ptb: bool = False,
    uncertain_as: UncertainAs = "negative",
    out: str | os.PathLike | None = None,
    labeler: ReportsLabeler | None = None,
) -> dict[str, Any]:
    """NLG + CE metrics of predicted vs reference reports.

    `predictions` is a JSONL path or the records themselves. The result is written to `out`,
    or next to a path input as `<name>.metrics.json`; records given in memory without `out`
    are not written. `labeler` labels both sides for CE (default: the built-in rules); its
    `name` is recorded as `labeler`.
    """
    labeler = default_labeler() if labeler is None else labeler
    if isinstance(predictions, (str, os.PathLike)):
        records = read_predictions(predictions)
        out = metrics_path(predictions) if out is None else out
    else:
        records = [_check(r, f"record {i}") for i, r in enumerate(predictions)]
        if not records:
            raise ValueError("no predictions")
    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"id {duplicate!r} appears more than once")
    references = [r["reference"] for r in records]
    generated = [r["prediction"] for r in records]

    result: dict[str, Any] = {"n": len(records), "ptb_tokenizer": ptb}
    result.update(nlg_scores(references, generated, ptb=ptb))
    result.update(
        ce_scores(
            labeler.label_many(generated), labeler.label_many(references), uncertain_as=uncertain_as
        )
    )
    result["labeler"] = labeler.name
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
