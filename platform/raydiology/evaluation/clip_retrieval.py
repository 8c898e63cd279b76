"""Evaluation of an image-report CLIP on a held-out split: cross-modal retrieval and
zero-shot finding prediction from prompt sentences.

Retrieval ranks every candidate of the other modality by cosine similarity. Templated or
routine reports repeat word for word ("No acute cardiopulmonary abnormality."), so a
candidate counts as relevant when its report text equals the query's (`positives`): a model
cannot tell apart two identical reports, and index-only matching would punish it for that.
The rank of a query is 1 + the number of candidates scored strictly above its best relevant
one. Random ranking is the baseline: `random_recall_at` gives its expected Recall@k.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Zero-shot prompts for the phantom / CheXpert findings: (positive, negative) sentences in
# the reports' own wording (a prompt the text tower never saw can land on either side).
DEFAULT_PROMPTS: dict[str, tuple[str, str]] = {
    "label_cardiomegaly": ("The heart is enlarged.", "The heart size is normal."),
    "label_pleural_effusion": ("There is pleural effusion.", "No pleural effusion."),
    "label_pneumothorax": ("There is a pneumothorax.", "No pneumothorax."),
    "label_lung_lesion": ("There is a nodule in the lung.", "The lungs are clear."),
    "label_support_devices": ("Support devices in place.", "No support devices are seen."),
}


def same_text(queries: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
    """bool [Nq, Nc]: candidate j is relevant to query i when their texts are equal."""
    return np.asarray(queries, dtype=object)[:, None] == np.asarray(candidates, dtype=object)[None]


def ranks(similarity: Tensor, positives: Tensor | np.ndarray) -> Tensor:
    """similarity [Nq, Nc], positives bool [Nq, Nc] (>= 1 per row) -> rank [Nq] (1 = top)."""
    pos = torch.as_tensor(positives, dtype=torch.bool, device=similarity.device)
    if not bool(pos.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant candidate")
    best = similarity.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values
    return (similarity > best).sum(dim=1) + 1


def retrieval_metrics(
    similarity: Tensor, positives: Tensor | np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k (share of queries whose first relevant candidate is in the top k) and MRR."""
    r = ranks(similarity, positives).float()
    out = {f"R@{k}": float((r <= k).float().mean()) for k in ks}
    out["MRR"] = float((1.0 / r).mean())
    return out


def random_recall_at(positives: np.ndarray, k: int) -> float:
    """Expected Recall@k of a uniformly random ranking: P(some relevant item in the top k)."""
    n = positives.shape[1]
    hits = []
    for m in positives.sum(axis=1):
        # P(no relevant in k draws without replacement from n with m relevant)
        miss = 1.0
        for i in range(min(k, n)):
            miss *= max(n - m - i, 0) / (n - i)
        hits.append(1.0 - miss)
    return float(np.mean(hits))


def random_mrr(positives: np.ndarray) -> float:
    """Expected MRR of a uniformly random ranking (first relevant item's reciprocal rank)."""
    n = positives.shape[1]
    out = []
    for m in positives.sum(axis=1):
        # P(first relevant at rank r) = P(r - 1 misses) * m / (n - r + 1)
        miss, total = 1.0, 0.0
        for r in range(1, n - int(m) + 2):
            total += miss * m / (n - r + 1) / r
            miss *= (n - m - r + 1) / (n - r + 1)
        out.append(total)
    return float(np.mean(out))


def zero_shot_auroc(
    image_features: Tensor,
    prompt_features: dict[str, tuple[Tensor, Tensor]],
    labels: dict[str, np.ndarray],
) -> dict[str, float | None]:
    """Per label: AUROC of cos(image, positive prompt) - cos(image, negative prompt).

    image_features [N, P]; prompt_features label -> (positive [P], negative [P]); labels
    label -> {0, 1} [N]. None where the split holds a single class.
    """
    from sklearn.metrics import roc_auc_score

    image = F.normalize(image_features.float(), dim=-1)
    out: dict[str, float | None] = {}
    for name, (pos, neg) in prompt_features.items():
        y = np.asarray(labels[name])
        score = image @ F.normalize(pos.float(), dim=-1) - image @ F.normalize(neg.float(), dim=-1)
        out[name] = float(roc_auc_score(y, score.cpu().numpy())) if 0 < y.sum() < len(y) else None
    return out


@torch.no_grad()
def evaluate_clip(
    model: Any,
    corpus: str | Path,
    data: Any,
    *,
    split: str | Sequence[str] | None = "test",
    prompts: dict[str, tuple[str, str]] | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Both retrieval directions and zero-shot AUROC for an `ImageReportClip` on a split
    (or several, e.g. ("val", "test")).

    `data` is the run's DataConfig (resolution, channels, normalisation) so images are
    prepared as in training. Returns metrics plus the random-ranking baselines.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from raydiology.data.corpus import read_rows
    from raydiology.data.pipeline import preprocess_batch, to_model_input

    was_training = model.training
    model.eval()
    table = read_rows(corpus)
    if split is not None and "split" in table.column_names:
        wanted = [split] if isinstance(split, str) else list(split)
        table = table.filter(pc.is_in(table.column("split"), value_set=pa.array(wanted)))
    prompts = {k: v for k, v in (prompts or DEFAULT_PROMPTS).items() if k in table.column_names}
    device = model.image_proj.weight.device
    images, texts = [], []
    for start in range(0, table.num_rows, batch_size):
        chunk = table.slice(start, batch_size)
        batch = {n: chunk.column(n).to_numpy(zero_copy_only=False) for n in chunk.column_names}
        pixels = preprocess_batch(batch, data=data, label_columns=[])["image"]
        x = to_model_input(torch.from_numpy(pixels).to(device), data, dtype=torch.float32)
        reports = [str(r or "") for r in batch["report"]]
        images.append(model.encode_images(x))
        texts.append(model.encode_reports(reports))
    reports = [str(r or "") for r in table.column("report").to_pylist()]
    image, text = F.normalize(torch.cat(images), dim=-1), F.normalize(torch.cat(texts), dim=-1)
    sim = image @ text.t()
    positives = same_text(reports, reports)
    out: dict[str, Any] = {"n": len(reports)}
    out["image_to_report"] = retrieval_metrics(sim, positives)
    out["report_to_image"] = retrieval_metrics(sim.t(), positives.T)
    out["random"] = {f"R@{k}": random_recall_at(positives, k) for k in (1, 5, 10)}
    out["random"]["MRR"] = random_mrr(positives)
    if prompts:
        feats = {
            name: tuple(model.encode_reports([p, n]).unbind(0)) for name, (p, n) in prompts.items()
        }
        labels = {name: table.column(name).to_numpy(zero_copy_only=False) for name in prompts}
        out["zero_shot_auroc"] = zero_shot_auroc(torch.cat(images), feats, labels)
    model.train(was_training)
    return out
