"""Clinical efficacy (CE): precision / recall / F1 of the findings a generated report states.

Both reports are labeled for the 14 CheXpert observations (`labeler.py`), each label is made
binary, and the generated report's labels are scored against the reference's as 14 binary
classification problems. R2Gen's CE code (used by R2GenGPT, MambaXray-VL and CXPMRG-Bench)
counts uncertain (-1) and not mentioned (blank) as negative and averages like scikit-learn:
micro sums true/false positives over all observations, macro averages the per-observation
figures (macro F1 is the mean of per-observation F1s, and 0/0 counts as 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from raydiology.evaluation.labeler import OBSERVATIONS, POSITIVE, UNCERTAIN, Label

UncertainAs = Literal["negative", "positive"]
UNCERTAIN_AS: tuple[str, ...] = ("negative", "positive")


def binarize(label: Label, *, uncertain_as: UncertainAs = "negative") -> bool:
    """1 -> True; -1 -> `uncertain_as`; 0 and blank -> False."""
    if label == UNCERTAIN:
        return uncertain_as == "positive"
    return label == POSITIVE


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def ce_scores(
    predicted: Sequence[Mapping[str, Label]],
    reference: Sequence[Mapping[str, Label]],
    *,
    uncertain_as: UncertainAs = "negative",
    observations: Sequence[str] = OBSERVATIONS,
) -> dict[str, object]:
    """CE figures between the labels of generated and reference reports (same order).

    Returns `ce_{precision,recall,f1}_{micro,macro}` and `ce_per_observation`:
    {observation: {precision, recall, f1, tp, fp, fn, support}} (support = reference
    positives).
    """
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predicted label sets but {len(reference)} references")
    if uncertain_as not in UNCERTAIN_AS:
        raise ValueError(f"uncertain_as must be one of {UNCERTAIN_AS}, not {uncertain_as!r}")
    per: dict[str, dict[str, float | int]] = {}
    totals = [0, 0, 0]
    for obs in observations:
        tp = fp = fn = 0
        for p, r in zip(predicted, reference, strict=True):
            yp = binarize(p.get(obs), uncertain_as=uncertain_as)
            yr = binarize(r.get(obs), uncertain_as=uncertain_as)
            tp += yp and yr
            fp += yp and not yr
            fn += yr and not yp
        precision, recall, f1 = _prf(tp, fp, fn)
        per[obs] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "support": tp + fn,
        }
        totals = [totals[0] + tp, totals[1] + fp, totals[2] + fn]
    micro = _prf(*totals)
    n = len(observations)
    macro = [sum(float(per[o][k]) for o in observations) / n for k in ("precision", "recall", "f1")]
    return {
        "ce_precision_micro": micro[0],
        "ce_recall_micro": micro[1],
        "ce_f1_micro": micro[2],
        "ce_precision_macro": macro[0],
        "ce_recall_macro": macro[1],
        "ce_f1_macro": macro[2],
        "ce_uncertain_as": uncertain_as,
        "ce_per_observation": per,
    }
