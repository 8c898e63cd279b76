"""Yardstick results as JSON and as a markdown table, one row per encoder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(stats: dict[str, float | None]) -> str:
    if stats["mean"] is None:
        return "-"
    return f"{_num(stats['mean'])} ± {_num(stats['std'])}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def probe_table(results: list[dict[str, Any]]) -> str:
    """Columns per training fraction: mean AUROC ± std over seeds, and MCC ± std."""
    fractions: list[str] = []
    for r in results:
        fractions += [f for f in r["fractions"] if f not in fractions]
    header = ["encoder", "pool"]
    for f in fractions:
        header += [f"AUROC {f}", f"MCC {f}"]
    rows = []
    for r in results:
        row = [r["encoder"], r["pooling"]]
        for f in fractions:
            cell = r["fractions"].get(f)
            row += [_pm(cell["auroc_mean"]), _pm(cell["mcc"])] if cell else ["-", "-"]
        rows.append(row)
    first = results[0] if results else {}
    seeds = first.get("config", {}).get("seeds", "?")
    caption = (
        f"Probe ({first.get('task', '?')}, {seeds} seeds, mean ± std) on "
        f"{', '.join(first.get('labels', []))}; test n = {first.get('n', {}).get('test', '?')}."
    )
    return caption + "\n\n" + _table(header, rows) + "\n"


def retrieval_table(results: list[dict[str, Any]]) -> str:
    """Columns: Precision@k for each k, and the precision of a random ranking."""
    ks: list[str] = []
    for r in results:
        ks += [k for k in r["precision"] if k not in ks]
    header = ["encoder", "pool", *(f"P@{k}" for k in ks), "chance"]
    rows = [
        [r["encoder"], r["pooling"], *(_num(r["precision"].get(k)) for k in ks), _num(r["chance"])]
        for r in results
    ]
    first = results[0] if results else {}
    caption = (
        f"Retrieval (cosine; queries = {first.get('queries', 'test')} "
        f"n = {first.get('n_queries', '?')}, gallery = {first.get('gallery', 'train')} "
        f"n = {first.get('n_gallery', '?')}; relevant = {first.get('match', '?')} label match) "
        f"on {', '.join(first.get('labels', []))}."
    )
    return caption + "\n\n" + _table(header, rows) + "\n"


def _median_iqr(values: list[float]) -> str:
    if not values:
        return "-"
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return f"{_num(float(q2))} [{_num(float(q1))}, {_num(float(q3))}]"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def bias_table(results: list[dict[str, Any]]) -> str:
    """Per encoder and test subgroup: scores of the probes trained on the subgroup and on
    all (median [IQR]) with the Mann-Whitney U and p; then the all-probe between subgroups."""
    header = ["encoder", "tested on", "n test", "trained on subgroup", "trained on all", "U", "p"]
    rows, pairs = [], []
    for r in results:
        for c in r["comparisons"]:
            if c["kind"] == "subgroup vs all":
                g = c["tested_on"]
                rows.append([
                    r["encoder"], f"{r['by']}={g}", str(r["n"][g]["test"]),
                    _median_iqr(r["scores"][g][g]), _median_iqr(r["scores"]["all"][g]),
                    _num(c["u"], 1), _p(c["p"]),
                ])  # fmt: skip
            else:
                pairs.append([
                    r["encoder"], f"{c['a']} vs {c['b']}", _median_iqr(r["scores"]["all"][c["a"]]),
                    _median_iqr(r["scores"]["all"][c["b"]]), _num(c["u"], 1), _p(c["p"]),
                ])  # fmt: skip
    first = results[0] if results else {}
    repeats = first.get("config", {}).get("seeds", "?")
    boot = first.get("bootstrap", 0)
    caption = (
        f"Subgroup bias by {first.get('by', '?')}: test AUROC (mean over "
        f"{', '.join(first.get('labels', []))}), median [IQR] over {repeats} seeds"
        + (f" x {boot} bootstrap resamples" if boot else "")
        + "; two-sided Mann-Whitney U between the score distributions."
    )
    out = caption + "\n\n" + _table(header, rows) + "\n"
    if pairs:
        header = ["encoder", "trained on all, tested on a vs b", "on a", "on b", "U", "p"]
        out += "\n" + _table(header, pairs) + "\n"
    return out


def segment_table(results: list[dict[str, Any]]) -> str:
    """Columns: test Dice per class and their mean, one row per (encoder, decoder)."""
    classes: list[str] = []
    for r in results:
        classes += [c for c in r["classes"] if c not in classes]
    header = ["encoder", "decoder", *classes, "mean", "steps"]
    rows = [
        [r["encoder"], r["decoder"], *(_num(r["dice"].get(c)) for c in classes),
         _num(r["dice_mean"]), str(r["steps"])]
        for r in results
    ]  # fmt: skip
    first = results[0] if results else {}
    n = first.get("n", {})
    caption = (
        f"Segmentation (frozen encoder; test Dice per class over images with the structure; "
        f"train n = {n.get('train', '?')}, val n = {n.get('val', '?')}, "
        f"test n = {n.get('test', '?')})."
    )
    return caption + "\n\n" + _table(header, rows) + "\n"


def detect_table(results: list[dict[str, Any]]) -> str:
    """Columns: test mAP@50 (all classes, then per class) and mean IoU, one row per encoder."""
    classes: list[str] = []
    for r in results:
        classes += [c for c in r["classes"] if c not in classes]
    per_class = [f"AP50 {c}" for c in classes] if len(classes) > 1 else []
    header = ["encoder", "mAP@50", *per_class, "mean IoU", "steps"]
    rows = [
        [r["encoder"], _num(r["map50"]),
         *(_num(r["map50_per_class"].get(c)) for c in (classes if per_class else [])),
         _num(r["mean_iou"]), str(r["steps"])]
        for r in results
    ]  # fmt: skip
    first = results[0] if results else {}
    n = first.get("n", {})
    caption = (
        f"Detection (frozen encoder, DETR-style decoder; test mAP@50 by torchmetrics, mean IoU "
        f"of each true box with the top prediction of its class; {first.get('test_boxes', '?')}"
        f" test boxes; train n = {n.get('train', '?')}, val n = {n.get('val', '?')}, "
        f"test n = {n.get('test', '?')} images)."
    )
    return caption + "\n\n" + _table(header, rows) + "\n"


def ground_table(results: list[dict[str, Any]]) -> str:
    """Columns: test accuracy at IoU > 0.5 and mean IoU, one row per encoder."""
    rows = [[r["encoder"], _num(r["acc50"]), _num(r["mean_iou"]), str(r["steps"])]
            for r in results]  # fmt: skip
    first = results[0] if results else {}
    n = first.get("n", {})
    caption = (
        f"Phrase grounding (frozen encoder and text tower `{first.get('text', '?')}`; test "
        f"accuracy at IoU > 0.5 and mean IoU over (image, phrase, box) triples; train n = "
        f"{n.get('train', '?')}, val n = {n.get('val', '?')}, test n = {n.get('test', '?')})."
    )
    return caption + "\n\n" + _table(["encoder", "acc@IoU>0.5", "mean IoU", "steps"], rows) + "\n"


def write_results(
    results: list[dict[str, Any]], out_dir: str | os.PathLike, kind: str, *, corpus: str
) -> tuple[Path, Path, str]:
    """Write `<kind>.json` and `<kind>.md` into `out_dir`; returns both paths and the table."""
    tables = {
        "probe": probe_table, "retrieval": retrieval_table, "bias": bias_table,
        "segment": segment_table, "detect": detect_table, "ground": ground_table,
    }  # fmt: skip
    if kind not in tables:
        raise ValueError(f"kind {kind!r} is not one of {sorted(tables)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = tables[kind](results)
    json_path, md_path = out / f"{kind}.json", out / f"{kind}.md"
    payload = {"kind": kind, "corpus": corpus, "results": results}
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    md_path.write_text(f"# {kind} — {corpus}\n\n{table}")
    return json_path, md_path, table
