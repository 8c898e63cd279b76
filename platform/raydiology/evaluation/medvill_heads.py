"""MedViLL downstream heads on a corpus split: diagnosis (micro AUROC / F1, as the paper's
Table reports them, sklearn) and templated VQA (closed and open accuracy, apart).

    raydiology evaluate medvill RUN --task diagnosis|vqa --corpus CORPUS --split test

writes `<run>/eval/medvill_<task>.json` (or `--out`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

TASKS = ("diagnosis", "vqa")


def diagnosis_metrics(
    targets: np.ndarray, probs: np.ndarray, names: list[str], *, threshold: float = 0.5
) -> dict[str, Any]:
    """targets, probs [N, K] -> micro/macro AUROC and F1 (probability > threshold).

    Micro pools every (image, label) pair; a label with only one class in `targets` gets no
    AUROC of its own and is left out of the macro mean.
    """
    from sklearn.metrics import f1_score, roc_auc_score

    targets = (np.asarray(targets) > 0.5).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    predicted = (probs > threshold).astype(int)
    per_label: dict[str, float | None] = {}
    for k, name in enumerate(names):
        column = targets[:, k]
        both = column.min() != column.max()
        per_label[name] = float(roc_auc_score(column, probs[:, k])) if both else None
    scored = [v for v in per_label.values() if v is not None]
    flat = targets.ravel()
    return {
        "micro_auroc": float(roc_auc_score(flat, probs.ravel()))
        if flat.min() != flat.max()
        else None,
        "macro_auroc": float(np.mean(scored)) if scored else None,
        "micro_f1": float(f1_score(targets, predicted, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(targets, predicted, average="macro", zero_division=0)),
        "auroc_per_label": per_label,
        "threshold": threshold,
        "images": len(targets),
    }


def vqa_metrics(kinds: list[str], answers: list[str], predicted: list[str]) -> dict[str, Any]:
    """Exact-match accuracy over closed (yes/no) and open questions, apart and together."""
    right = np.array([a == p for a, p in zip(answers, predicted, strict=True)], dtype=float)
    kind = np.array(kinds)
    out: dict[str, Any] = {"accuracy": float(right.mean()) if len(right) else None}
    for name in ("closed", "open"):
        chosen = right[kind == name]
        out[f"{name}_accuracy"] = float(chosen.mean()) if len(chosen) else None
        out[f"{name}_questions"] = len(chosen)
    return out


def _split_rows(corpus: str | Path, split: str | Sequence[str] | None, columns: list[str]):
    from raydiology.data.corpus import read_rows
    from raydiology.data.pipeline import _PIXEL_COLUMNS

    wanted = [*_PIXEL_COLUMNS, *columns, *(["split"] if split else [])]
    table = read_rows(corpus, columns=list(dict.fromkeys(wanted)))
    if split is not None:
        import pyarrow as pa
        import pyarrow.compute as pc

        splits = [split] if isinstance(split, str) else list(split)
        table = table.filter(pc.is_in(table.column("split"), value_set=pa.array(splits)))
    if table.num_rows == 0:
        raise ValueError(f"{corpus}: no rows in split {split!r}")
    return table


@torch.no_grad()
def evaluate_medvill_heads(
    run_or_export_dir: str | Path,
    corpus: str | Path,
    *,
    task: str,
    split: str | Sequence[str] | None = "test",  # a split, several, or None: every row
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Score a fine-tuned MedViLL's head on a corpus split; writes and returns the JSON."""
    from raydiology.config import DataConfig
    from raydiology.config_base import from_dict
    from raydiology.data.pipeline import preprocess_batch, to_model_input
    from raydiology.models.medvill import find_medvill_export
    from raydiology.objectives.medvill_downstream import (
        MedViLLDiagnosis,
        MedViLLVQA,
        load_medvill_task,
    )

    if task not in TASKS:
        raise ValueError(f"task {task!r}: one of {', '.join(TASKS)}")
    started = time.perf_counter()
    objective, spec = load_medvill_task(run_or_export_dir, device=device)
    wanted = MedViLLDiagnosis if task == "diagnosis" else MedViLLVQA
    if not isinstance(objective, wanted):
        raise ValueError(f"{run_or_export_dir}: a {type(objective).__name__} export, "
                         f"not a {task} one")  # fmt: skip
    data = from_dict(DataConfig, {"resolution": spec["image_size"], "channels": spec["in_chans"],
                                  "mean": spec["mean"], "std": spec["std"]}, "data")  # fmt: skip
    cfg = objective.cfg
    table = _split_rows(corpus, split, list(cfg.corpus_columns().values()))
    outputs: list[Any] = []
    for start in range(0, table.num_rows, batch_size):
        chunk = table.slice(start, batch_size)
        batch = {n: chunk.column(n).to_numpy(zero_copy_only=False) for n in chunk.column_names}
        pixels = preprocess_batch(batch, data=data, label_columns=[])["image"]
        images = to_model_input(torch.from_numpy(pixels).to(device), data, dtype=torch.float32)
        labels = torch.from_numpy(
            np.stack([np.asarray(batch[c], dtype=np.float32) for c in cfg.label_columns], axis=1)
        )
        if isinstance(objective, MedViLLDiagnosis):
            reports = (
                None if cfg.report_column is None else [str(r) for r in batch[cfg.report_column]]
            )
            probs = objective.predict_logits(images, reports).sigmoid().float().cpu().numpy()
            outputs.append((labels.numpy(), probs))
        else:
            assert isinstance(objective, MedViLLVQA)
            items = objective.items([str(i) for i in batch[cfg.seed_column]], labels)
            logits = objective.answer_logits(images, [[it.question for it in r] for r in items])
            guesses = [objective.answers[i] for i in logits.argmax(dim=1).tolist()]
            outputs.extend(zip([it for r in items for it in r], guesses, strict=True))
    if isinstance(objective, MedViLLDiagnosis):
        targets = np.concatenate([t for t, _ in outputs])
        probs = np.concatenate([p for _, p in outputs])
        metrics = diagnosis_metrics(targets, probs, list(cfg.label_columns),
                                    threshold=cfg.threshold)  # fmt: skip
    else:
        metrics = vqa_metrics([it.kind for it, _ in outputs], [it.answer for it, _ in outputs],
                              [g for _, g in outputs])  # fmt: skip
    export = find_medvill_export(run_or_export_dir)
    run_dir = export.parent if export.name == "export" else export
    result = {
        "task": task,
        "run": str(run_dir),
        "experiment": spec.get("experiment"),
        "pretrained": spec["model"].get("pretrained"),  # null: the fine-tuning-only baseline
        "corpus": str(corpus),
        "split": split,
        **metrics,
        "seconds": round(time.perf_counter() - started, 3),
    }
    path = Path(out) if out is not None else run_dir / "eval" / f"medvill_{task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["path"] = str(path)
    return result
