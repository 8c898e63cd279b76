"""Score generated reports: NLG metrics and clinical efficacy in one JSON object.

Input: JSON Lines, one object per report with `id`, `reference` and `prediction` (texts);
other keys are ignored. Output (also written next to the input as `<name>.metrics.json`):

    {"n": 590, "ptb_tokenizer": false, "BLEU_1": ..., "BLEU_4": ..., "METEOR": ...,
     "ROUGE_L": ..., "CIDEr": ..., "ce_precision_micro": ..., "ce_recall_micro": ...,
     "ce_f1_micro": ..., "ce_*_macro": ..., "ce_uncertain_as": "negative",
     "ce_per_observation": {"Cardiomegaly": {"precision": ..., ...}, ...},
     "labeler": "raydiology-rules", "protocol": {"name": "raydiology", "clean": ..., ...},
     "ce_labeler_matches_protocol": true}

The evaluation protocol (`evaluation/protocol.py`) decides PTB and the uncertain mapping and
names the labeler its CE numbers should come from; by default it is the one `raydiology
generate` recorded in run.json beside the predictions. CE labels come from a labeler run
here, or from two labels CSVs made by any labeler (the CheXpert labeler, CheXbert,
`raydiology label`), matched to the predictions by id or, for the CheXpert labeler's
"Reports" column, by row order as R2Gen's compute_ce.py matches them.
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from raydiology.evaluation.clinical import UncertainAs, ce_scores
from raydiology.evaluation.labeler import Label, LabelsFile, default_labeler, read_labels_csv
from raydiology.evaluation.nlg import nlg_scores
from raydiology.evaluation.protocol import PRESETS, Protocol

REQUIRED = ("id", "reference", "prediction")
LABELER_NAME = "raydiology-rules"  # the built-in labeler's name, as recorded in results


class ReportsLabeler(typing.Protocol):
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


def _aligned(
    found: LabelsFile, path: str | os.PathLike, ids: list[str], texts: list[str]
) -> tuple[list[dict[str, Label]], str]:
    """A labels file's rows in the predictions' order: by id when its first column holds the
    ids, else by row order (the CheXpert labeler writes the report text there, in its input
    order); ('id' | 'order') says which."""
    by_key = dict(zip(found.keys, found.labels, strict=True))
    if all(i in by_key for i in ids):
        return [by_key[i] for i in ids], "id"
    if len(found.labels) != len(ids):
        raise ValueError(
            f"{path}: {len(found.labels)} label rows for {len(ids)} predictions, and its first "
            "column does not hold their ids"
        )
    differ = [
        n for n, (k, t) in enumerate(zip(found.keys, texts, strict=True)) if k.split() != t.split()
    ]
    if found.keys and all(k.strip() for k in found.keys) and len(differ) == len(ids):
        raise ValueError(f"{path}: its first column holds neither the ids nor the report texts")
    return list(found.labels), "order"


def metrics_path(predictions: str | os.PathLike) -> Path:
    """`run/preds.jsonl` -> `run/preds.metrics.json`."""
    path = Path(predictions)
    return path.with_name(path.name.removesuffix(".jsonl").removesuffix(".json") + ".metrics.json")


def recorded_protocol(predictions: str | os.PathLike) -> Protocol:
    """The protocol `raydiology generate` recorded in run.json beside the predictions (the
    default protocol without one)."""
    info = Path(predictions).with_name("run.json")
    recorded = (
        json.loads(info.read_text(encoding="utf-8")).get("protocol") if info.is_file() else None
    )
    return Protocol(**recorded) if recorded else PRESETS["raydiology"]


def evaluate_predictions(
    predictions: str | os.PathLike | Iterable[Mapping[str, Any]],
    *,
    protocol: Protocol | None = None,
    ptb: bool | None = None,
    uncertain_as: UncertainAs | None = None,
    out: str | os.PathLike | None = None,
    labeler: ReportsLabeler | None = None,
    labels: tuple[str | os.PathLike, str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """NLG + CE metrics of predicted vs reference reports.

    `predictions` is a JSONL path or the records themselves. The result is written to `out`,
    or next to a path input as `<name>.metrics.json`; records given in memory without `out`
    are not written. `protocol` (default: the one recorded beside a path input) sets PTB and
    the uncertain mapping; `ptb` and `uncertain_as` given here change it (its name then ends
    in "+custom"). CE labels come from `labels` = (reference CSV, prediction CSV) when given,
    else from `labeler` run on both sides (default: the built-in rules); which one is recorded
    as `labeler`.
    """
    if isinstance(predictions, (str, os.PathLike)):
        records = read_predictions(predictions)
        out = metrics_path(predictions) if out is None else out
        protocol = protocol or recorded_protocol(predictions)
    else:
        records = [_check(r, f"record {i}") for i, r in enumerate(predictions)]
        if not records:
            raise ValueError("no predictions")
    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"id {duplicate!r} appears more than once")
    protocol = (protocol or PRESETS["raydiology"]).with_changes(
        **({} if ptb is None else {"ptb": ptb}),
        **({} if uncertain_as is None else {"ce_uncertain_as": uncertain_as}),
    )
    references = [r["reference"] for r in records]
    generated = [r["prediction"] for r in records]

    result: dict[str, Any] = {"n": len(records), "ptb_tokenizer": protocol.ptb}
    result.update(nlg_scores(references, generated, ptb=protocol.ptb))
    if labels is not None:
        ref_file, pred_file = (read_labels_csv(p) for p in labels)
        ref_labels, ref_match = _aligned(ref_file, labels[0], ids, references)
        pred_labels, pred_match = _aligned(pred_file, labels[1], ids, generated)
        names = {ref_file.labeler, pred_file.labeler}
        name = names.pop() if len(names) == 1 else f"{ref_file.labeler} / {pred_file.labeler}"
        result["ce_matched_by"] = ref_match if ref_match == pred_match else "id / order"
    else:
        labeler = default_labeler() if labeler is None else labeler
        ref_labels, pred_labels = labeler.label_many(references), labeler.label_many(generated)
        name = labeler.name
    result.update(ce_scores(pred_labels, ref_labels, uncertain_as=protocol.ce_uncertain_as))
    result["labeler"] = name
    result["protocol"] = protocol.describe()
    result["ce_labeler_matches_protocol"] = name == protocol.ce_labeler
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
