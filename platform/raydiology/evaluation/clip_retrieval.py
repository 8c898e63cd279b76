"""Evaluation of an image-report CLIP on a held-out split: cross-modal retrieval and
zero-shot finding prediction from prompt sentences.

Retrieval ranks every candidate of the other modality by cosine similarity. Templated or
routine reports repeat word for word ("No acute cardiopulmonary abnormality."), so a
candidate counts as relevant when its report text equals the query's (`positives`): a model
cannot tell apart two identical reports, and index-only matching would punish it for that.
The rank of a query is the position of its first relevant candidate, candidates sorted by
score with ties in a seeded random order (`raydiology.evaluation.ranking`), so a model that
scores everything alike gets the random baseline, not a perfect score. Random ranking is the baseline: `random_recall_at` gives its expected Recall@k.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raydiology.evaluation.ranking import first_relevant_rank

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
    """similarity [Nq, Nc], positives bool [Nq, Nc] (>= 1 per row) -> rank [Nq] (1 = top) of
    the first relevant candidate, ties broken at random (`evaluation.ranking`)."""
    return first_relevant_rank(similarity, torch.as_tensor(positives))


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


@dataclass
class SplitEmbeddings:
    """One corpus split through both towers: row i of `image` and `text` is row i of `table`."""

    table: Any  # pyarrow.Table: the split's rows (labels, pixels for pictures)
    reports: list[str]
    image: Tensor  # [N, P], unnormalised
    text: Tensor  # [N, P], unnormalised


def eval_data(data: Any) -> Any:
    """The run's input preparation without training-time augmentation or resampling."""
    from raydiology.config import DataConfig
    from raydiology.config_base import from_dict

    d = from_dict(DataConfig, data, "data") if isinstance(data, dict) else data
    return DataConfig(resolution=d.resolution, channels=d.channels, mean=tuple(d.mean),
                      std=tuple(d.std))  # fmt: skip


def select_split(table: Any, split: str | Sequence[str] | None) -> Any:
    """Rows whose `split` is `split` (or one of several); None = every row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if split is None or "split" not in table.column_names:
        return table
    wanted = [split] if isinstance(split, str) else list(split)
    return table.filter(pc.is_in(table.column("split"), value_set=pa.array(wanted)))


def model_input(table: Any, data: Any, device: torch.device | str) -> tuple[Tensor, np.ndarray]:
    """Corpus rows -> (normalised float [B, C, R, R], integer pixels [B, 1, R, R])."""
    from raydiology.data.pipeline import preprocess_batch, to_model_input

    batch = {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
    pixels = preprocess_batch(batch, data=data, label_columns=[])["image"]
    return to_model_input(torch.from_numpy(pixels).to(device), data, dtype=torch.float32), pixels


@torch.no_grad()
def embed_split(
    model: Any,
    corpus: str | Path,
    data: Any,
    *,
    split: str | Sequence[str] | None = "test",
    batch_size: int = 32,
) -> SplitEmbeddings:
    """Both towers over a split of `corpus`, images prepared as in training (no augmentation)."""
    from raydiology.data.corpus import read_rows

    data = eval_data(data)
    table = select_split(read_rows(corpus), split)
    if table.num_rows == 0:
        raise ValueError(f"{corpus}: no rows in split {split!r}")
    was_training = model.training
    model.eval()
    device = model.image_proj.weight.device
    reports = [str(r or "") for r in table.column("report").to_pylist()]
    images, texts = [], []
    for start in range(0, table.num_rows, batch_size):
        x, _ = model_input(table.slice(start, batch_size), data, device)
        images.append(model.encode_images(x))
        texts.append(model.encode_reports(reports[start : start + batch_size]))
    model.train(was_training)
    return SplitEmbeddings(table, reports, torch.cat(images), torch.cat(texts))


@torch.no_grad()
def clip_metrics(
    model: Any, emb: SplitEmbeddings, prompts: dict[str, tuple[str, str]] | None = None
) -> dict[str, Any]:
    """Retrieval both ways, random baselines and (where the labels exist) zero-shot AUROC."""
    table, reports = emb.table, emb.reports
    image, text = F.normalize(emb.image, dim=-1), F.normalize(emb.text, dim=-1)
    sim = image @ text.t()
    positives = same_text(reports, reports)
    out: dict[str, Any] = {"n": len(reports)}
    out["image_to_report"] = retrieval_metrics(sim, positives)
    out["report_to_image"] = retrieval_metrics(sim.t(), positives.T)
    out["random"] = {f"R@{k}": random_recall_at(positives, k) for k in (1, 5, 10)}
    out["random"]["MRR"] = random_mrr(positives)
    prompts = {k: v for k, v in (prompts or DEFAULT_PROMPTS).items() if k in table.column_names}
    if prompts:
        was_training = model.training
        model.eval()
        feats = {
            name: tuple(model.encode_reports([p, n]).unbind(0)) for name, (p, n) in prompts.items()
        }
        model.train(was_training)
        labels = {name: table.column(name).to_numpy(zero_copy_only=False) for name in prompts}
        out["zero_shot_auroc"] = zero_shot_auroc(emb.image, feats, labels)
    return out


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
    emb = embed_split(model, corpus, data, split=split, batch_size=batch_size)
    return clip_metrics(model, emb, prompts)


# ----------------------------------------------------------------------------- a finished run

EVAL_JSON = "clip.json"
EVAL_PICTURE = "clip_retrieval.png"


def run_corpus(export: Path) -> tuple[Path, str | None]:
    """The corpus a run trained on, from its resolved `config.yaml` (the phantom corpus is
    remade, identically, if it is gone) -> (folder, a warning when it is not the same data)."""
    from rich.console import Console

    from raydiology.config import load_experiment
    from raydiology.data.corpus import manifest_hash
    from raydiology.train.export import SPEC
    from raydiology.train.launch import resolve_corpus

    run_dir = export.parent if export.name == "export" else export
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no config.yaml to find the run's corpus; pass --corpus"
        )
    corpus = Path(resolve_corpus(load_experiment(config), console=Console(stderr=True)))
    trained_on = json.loads((export / SPEC).read_text()).get("corpus_manifest_sha256")
    if trained_on and trained_on != manifest_hash(corpus):
        return corpus, f"{corpus} is not the corpus the run trained on (manifest hash differs)"
    return corpus, None


def evaluate_clip_run(
    run_or_export: str | Path,
    *,
    corpus: str | Path | None = None,
    split: str | Sequence[str] | None = "test",
    out: str | Path | None = None,
    device: str = "cpu",
    queries: int = 4,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Reload a finished CLIP run from its export, evaluate it on a corpus split, and write
    `<run>/eval/clip.json` (or `out`) plus `clip_retrieval.png` beside it: `queries` query
    images with their top-3 retrieved reports. Returns the metrics, with "json", "picture"
    and "corpus" paths added (and "warning" when the corpus is not the run's own)."""
    from raydiology.models.clip import find_clip_export, load_clip

    export = find_clip_export(run_or_export)
    warning = None
    if corpus is None:
        corpus, warning = run_corpus(export)
    model = load_clip(export, device=device)
    spec = model.spec
    data = eval_data({"resolution": spec["image_size"], "channels": spec["in_chans"],
                      "mean": spec["mean"], "std": spec["std"]})  # fmt: skip
    emb = embed_split(model, corpus, data, split=split, batch_size=batch_size)
    metrics = clip_metrics(model, emb)
    run_dir = export.parent if export.name == "export" else export
    path = Path(out) if out is not None else run_dir / "eval" / EVAL_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = path.parent / EVAL_PICTURE
    save_retrieval_picture(emb, data, picture, queries=queries)
    info = {
        "run": str(run_dir),
        "corpus": str(corpus),
        "split": split,
        "step": spec.get("step"),
        **metrics,
        "picture": picture.name,
    }
    if warning:
        info["warning"] = warning
    path.write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "json": str(path), "picture": str(picture)}


def _sentences(report: str) -> list[str]:
    import re

    return [s for s in re.split(r"(?<=[.!?])\s+", report.strip()) if s]


def save_retrieval_picture(
    emb: SplitEmbeddings, data: Any, path: Path, *, queries: int = 4, top: int = 3
) -> Path:
    """Rows of query image | its report | the top-`top` retrieved reports with cosine scores.

    A retrieved report identical to the query's is boxed in green; in the others, sentences
    the query's report shares are green and the rest grey, so a near miss reads as one.
    Only images and report text are drawn: no identifiers or other metadata from the corpus.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(emb.reports)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(queries, n))})
    sim = F.normalize(emb.image.float(), dim=-1) @ F.normalize(emb.text.float(), dim=-1).t()
    _, pixels = model_input(emb.table.take(picks), data, "cpu")
    fig = plt.figure(figsize=(15, 3.6 * len(picks)))
    grid = fig.add_gridspec(len(picks), 2, width_ratios=(1, 4.2), wspace=0.02, hspace=0.12,
                            top=1 - 0.4 / fig.get_figheight())  # fmt: skip
    for row, (q, image) in enumerate(zip(picks, pixels, strict=True)):
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(image[0], cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"query {row + 1}", fontsize=9)
        ax = fig.add_subplot(grid[row, 1])
        ax.axis("off")
        truth = emb.reports[q]
        shared = set(_sentences(truth))
        lines: list[tuple[str, list[tuple[str, str]], bool]] = [
            ("the query's report", [(s, "black") for s in _sentences(truth)], False)
        ]
        scores, order = sim[q].topk(min(top, n))
        for rank, (score, j) in enumerate(zip(scores.tolist(), order.tolist(), strict=True)):
            report = emb.reports[j]
            same = report == truth
            colour = [(s, "green" if s in shared else "dimgray") for s in _sentences(report)]
            mark = "  = the query's report" if same else ""
            lines.append((f"#{rank + 1}  cos {score:.3f}{mark}", colour, same))
        _draw_reports(ax, lines)
    fig.suptitle(
        f"Top-{top} reports retrieved for each query image (cosine similarity). Green: sentences"
        " the query's own report contains; green box: its own report, word for word.",
        fontsize=9,
        y=0.995,
    )
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _draw_reports(ax: Any, blocks: list[tuple[str, list[tuple[str, str]], bool]]) -> None:
    """Headed blocks of coloured sentences, wrapped at ~150 characters, top to bottom."""
    from matplotlib.patches import Rectangle

    size, step, width = 7.5, 0.056, 150
    y = 0.98
    for head, sentences, boxed in blocks:
        ax.text(0.0, y, head, transform=ax.transAxes, fontsize=size, weight="bold", va="top")
        y -= step
        top = y + step * 0.2
        used, previous = 0, None
        for sentence, colour in sentences:
            piece = sentence + " "
            if previous is None or used + len(piece) > width:
                previous = ax.text(0.02, y, piece, transform=ax.transAxes, fontsize=size,
                                   color=colour, va="top")  # fmt: skip
                used = len(piece)
                y -= step
            else:  # continue the line right after the previous piece
                previous = ax.annotate(piece, xy=(1, 0), xycoords=previous, fontsize=size,
                                       color=colour, va="bottom")  # fmt: skip
                used += len(piece)
        if boxed:  # the retrieved report is the query's own (word for word)
            bottom = y - step * 0.1
            ax.add_patch(Rectangle((0.0, bottom), 0.99, top - bottom, fill=False,
                                   edgecolor="green", linewidth=1.5, transform=ax.transAxes,
                                   clip_on=False))  # fmt: skip
        y -= step * 0.3
