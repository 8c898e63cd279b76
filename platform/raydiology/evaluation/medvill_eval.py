"""MedViLL downstream evaluation without fine-tuning: image-report retrieval with the matching
head, and report generation by iterative [MASK] decoding under the S2S mask.

Retrieval (the paper's protocol): every query (an image, or a report) gets 100 candidates of
the other modality, its true partner plus 99 others drawn from the split (seeded per
direction and query, so every run and model sees the same sets). The joint encoder scores each
(image, report) pair with the matching head; candidates are ranked by the match log-odds
(logit "match" - logit "no match": the same order as P(match), but without the ties a
saturated float32 softmax makes). A candidate is relevant when its diagnosis labels equal the
query's, as the paper counts it (the official retrieval.py is a "label conditioned retrieval
task": its test pairs are aligned when their CheXpert labels match, retrieval.py lines 3 and
530-540): the matching head is trained to tell apart only pairs whose labels differ (its
negatives), so two reports stating the same findings in other words are equally good matches
to it. With `relevance="text"`, a candidate is relevant when its report text equals the
query's instead (as `clip_retrieval` counts it: templated reports repeat word for word, and
no model can tell two identical reports apart). Either way a query may have several relevant
candidates:

    MRR           mean of 1 / rank of the first relevant candidate
    Hit@5         share of queries with a relevant candidate in the top 5
    Recall@5      relevant candidates in the top 5 / relevant candidates in the set
    Precision@5   relevant candidates in the top 5 / 5

Ranks break tied scores at random (`raydiology.evaluation.ranking`, shared with CLIP and the
yardstick): a constant scorer gets the random baseline, not rank 1. The random baseline is the expectation of each metric under a uniformly random
ranking of the same candidate sets (MRR and Hit@5 from `clip_retrieval`; Recall@5 = 5 / K and
Precision@5 = mean relevant / K exactly).

Generation: the sequence starts as [CLS] V [SEP] (all grid positions); each step appends a
[MASK] after the words generated so far, the MLM head predicts it (greedy), and the prediction
replaces it, until [SEP] or the length limit. Only the model's own words are ever fed back
(no teacher forcing); the reference report is read only to be written beside the prediction.
Under S2S the [MASK] sees the image block and earlier words, never the [SEP] that the sequence
builder puts after it. A report ends early only if training taught the model to predict
the closing [SEP] (our pretraining MLM masks it like a word; the `medvill_s2s` fine-tune
masks it half the time, as the official one); otherwise every report runs to the length limit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raydiology.data.phantom import LABEL_COLUMNS
from raydiology.evaluation.clip_retrieval import random_mrr, random_recall_at, same_text
from raydiology.evaluation.ranking import best_first

DIRECTIONS = ("image_to_report", "report_to_image")
RELEVANCE = ("text", "labels")


def same_labels(labels: np.ndarray) -> np.ndarray:
    """labels [N, L] -> bool [N, N]: rows i and j are equal label by label. A missing label
    (NaN, as CheXpert leaves unmentioned findings) equals another missing one."""
    rows = np.nan_to_num(np.asarray(labels, dtype=np.float32), nan=np.inf)
    return (rows[:, None] == rows[None]).all(axis=-1)


# ----------------------------------------------------------------------------- candidates


def candidate_sets(n: int, candidates: int = 100, *, seed: int = 0, direction: int = 0) -> Tensor:
    """Long [n, K], K = min(candidates, n): row i holds i once and K - 1 distinct others of
    range(n), in a random order. Row i depends only on (seed, direction, i)."""
    if n < 1 or candidates < 1:
        raise ValueError(f"need at least one item and one candidate, got n={n}, K={candidates}")
    k = min(candidates, n)
    rows = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, direction, i])
        others = rng.choice(n - 1, size=k - 1, replace=False)
        others += others >= i  # skip i itself
        row = np.concatenate([[i], others])
        rng.shuffle(row)
        rows[i] = row
    return torch.from_numpy(rows)


def candidate_metrics(scores: Tensor, relevant: Tensor, *, k: int = 5) -> dict[str, float]:
    """scores [Q, K], relevant bool [Q, K] (>= 1 per row) -> MRR, Hit@k, Recall@k, Precision@k.

    Ties are broken at random (`evaluation.ranking`), as for every retrieval metric.
    """
    relevant = relevant.to(torch.bool).cpu()
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant candidate")
    sorted_relevant = relevant.gather(1, best_first(scores))
    first = sorted_relevant.float().argmax(dim=1) + 1  # rank of the first relevant
    in_top = sorted_relevant[:, :k].sum(dim=1).float()
    return {
        "MRR": float((1.0 / first.float()).mean()),
        f"Hit@{k}": float((first <= k).float().mean()),
        f"Recall@{k}": float((in_top / relevant.sum(dim=1)).mean()),
        f"Precision@{k}": float((in_top / k).mean()),
    }


def random_candidate_metrics(relevant: Tensor, *, k: int = 5) -> dict[str, float]:
    """The expected `candidate_metrics` of a uniformly random ranking of the same sets."""
    pos = relevant.to(torch.bool).cpu().numpy()
    n = pos.shape[1]
    top = min(k, n)
    return {
        "MRR": random_mrr(pos),
        f"Hit@{k}": random_recall_at(pos, k),
        f"Recall@{k}": top / n,
        f"Precision@{k}": float(pos.sum(axis=1).mean()) * top / n / k,
    }


# ----------------------------------------------------------------------------- scoring


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def visual_features(model: Any, images: Tensor, *, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """images [N, C, R, R] -> (CNN grid features [N, G, C'] and grid positions [N, G], on the
    CPU): computed once, then shared by every pair an image takes part in. Float32: 2 MiB an
    image for ResNet-50 at 512 px (16 x 16 x 2048), ~8 GB for MIMIC-CXR's test split."""
    feats, positions = [], []
    device = _device(model)
    for start in range(0, len(images), batch_size):
        f, p = model.visual_tokens(images[start : start + batch_size].to(device))
        feats.append(f.float().cpu())
        positions.append(p.cpu())
    return torch.cat(feats), torch.cat(positions)


@torch.no_grad()
def pair_scores(
    model: Any,
    feats: Tensor,
    positions: Tensor,
    texts: Sequence[list[int]],
    image_index: Tensor,
    text_index: Tensor,
    *,
    scheme: str | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Match log-odds [P] of the pairs (image_index[p], text_index[p]).

    feats [N, G, C'] / positions [N, G] from `visual_features`; texts are token ids; `scheme`
    is the attention mask (None = the model's own; `mixed` in eval mode is bi).
    """
    device = _device(model)
    out = []
    for start in range(0, len(image_index), batch_size):
        img = image_index[start : start + batch_size]
        txt = text_index[start : start + batch_size].tolist()
        hidden, segments, _ = model.joint(
            feats[img].to(device), positions[img].to(device), [texts[j] for j in txt],
            scheme=scheme,
        )  # fmt: skip
        logits = model.itm_head(model.pooled(hidden, segments)).float()
        out.append((logits[:, 1] - logits[:, 0]).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def evaluate_retrieval(
    model: Any, images: Tensor, reports: Sequence[str], **kwargs: Any
) -> dict[str, Any]:
    """`retrieval_from_features` for images [N, C, R, R] (normalised, as in training)."""
    was_training = model.training
    model.eval()
    feats, positions = visual_features(model, images)
    model.train(was_training)
    return retrieval_from_features(model, feats, positions, reports, **kwargs)


@torch.no_grad()
def retrieval_from_features(
    model: Any,
    feats: Tensor,
    positions: Tensor,
    reports: Sequence[str],
    *,
    candidates: int = 100,
    seed: int = 0,
    scheme: str | None = None,
    k: int = 5,
    batch_size: int = 64,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Both retrieval directions over `candidates` per query, and the random baseline.

    feats [N, G, C'] / positions [N, G] (`visual_features`) pair with reports [N]; with
    `labels` [N, L], a candidate is relevant when its label row equals the query's, else when
    its report text does. Returns {"n", "candidates", "seed", "attention", "relevance",
    "image_to_report": {metric: value}, "report_to_image": {...},
    "random": {direction: {metric: value}}}.
    """
    n = len(reports)
    if len(feats) != n:
        raise ValueError(f"{len(feats)} images but {n} reports")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} label rows but {n} reports")
    was_training = model.training
    model.eval()
    texts = [model.tokenizer.encode(r)[: model.cfg.max_text_tokens] for r in reports]
    if labels is None:
        same = torch.from_numpy(same_text(list(reports), list(reports)))  # [N, N]
    else:
        same = torch.from_numpy(same_labels(labels))
    queries = torch.arange(n)[:, None]
    out: dict[str, Any] = {"n": n, "candidates": min(candidates, n), "seed": seed,
                           "attention": model.mask_scheme(scheme),
                           "relevance": "text" if labels is None else "labels",
                           "random": {}}  # fmt: skip
    for direction, name in enumerate(DIRECTIONS):
        sets = candidate_sets(n, candidates, seed=seed, direction=direction)  # [N, K]
        query = queries.expand_as(sets)
        # image -> report: query image i with candidate reports; report -> image: the reverse
        image_index, text_index = (query, sets) if direction == 0 else (sets, query)
        scores = pair_scores(model, feats, positions, texts, image_index.flatten(),
                             text_index.flatten(), scheme=scheme,
                             batch_size=batch_size).view(sets.shape)  # fmt: skip
        relevant = same.gather(1, sets)  # candidate's report (or labels) == the query's
        out[name] = candidate_metrics(scores, relevant, k=k)
        out["random"][name] = random_candidate_metrics(relevant, k=k)
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_ids(
    model: Any,
    images: Tensor,
    *,
    max_tokens: int | None = None,
    min_tokens: int = 1,
    scheme: str = "s2s",
    batch_size: int = 16,
) -> list[list[int]]:
    """images [B, C, R, R] -> generated token ids per image (without [SEP]), greedy.

    `max_tokens` (default and at most the model's `max_text_tokens`) caps the words; [SEP]
    is not allowed before `min_tokens` words; [CLS]/[PAD]/[MASK] are never predicted.
    """
    tok = model.tokenizer
    limit = model.cfg.max_text_tokens if max_tokens is None else max_tokens
    limit = min(limit, model.cfg.max_text_tokens)  # words + [MASK] must fit the text block
    never = torch.tensor(sorted({tok.cls_id, tok.pad_id, tok.mask_id}))
    was_training = model.training
    model.eval()
    device = _device(model)
    results: list[list[int]] = []
    for start in range(0, len(images), batch_size):
        feats, positions = model.visual_tokens(images[start : start + batch_size].to(device))
        words: list[list[int]] = [[] for _ in range(len(feats))]
        active = list(range(len(feats)))
        for step in range(limit):
            rows = torch.tensor(active, device=device)
            texts = [[*words[i], tok.mask_id] for i in active]
            hidden, _, ids = model.joint(feats[rows], positions[rows], texts, scheme=scheme)
            at_mask = ids == tok.mask_id  # exactly one per row: the last word position
            logits = model.mlm_logits(hidden[at_mask]).float()  # [A, V]
            logits[:, never.to(device)] = float("-inf")
            if step < min_tokens:
                logits[:, tok.sep_id] = float("-inf")
            chosen = logits.argmax(dim=-1).tolist()
            still = []
            for i, token in zip(active, chosen, strict=True):
                if token != tok.sep_id:
                    words[i].append(int(token))
                    still.append(i)
            active = still
            if not active:
                break
        results.extend(words)
    model.train(was_training)
    return results


def generate_reports(model: Any, images: Tensor, **kwargs: Any) -> list[str]:
    """images [B, C, R, R] -> report texts (the tokenizer's decoding of `generate_ids`)."""
    return [model.tokenizer.decode(ids) for ids in generate_ids(model, images, **kwargs)]


def reference_text(model: Any, report: str) -> str:
    """The reference as the tokenizer sees it (cleaning, case, word pieces joined back), so
    NLG metrics compare like with like; not truncated to the generation limit."""
    return str(model.tokenizer.decode(model.tokenizer.encode(report)))


# ----------------------------------------------------------------------------- corpus level


def read_split(corpus: str | Path, split: str | None = "test", *, limit: int | None = None) -> Any:
    """The corpus rows of `split` (None = all), the first `limit` of them."""
    import pyarrow.compute as pc

    from raydiology.data.corpus import read_rows

    table = read_rows(corpus)
    if split is not None and "split" in table.column_names:
        table = table.filter(pc.equal(table.column("split"), split))
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise ValueError(f"{corpus}: no rows in split {split!r}")
    return table


def iter_images(table: Any, data: Any, *, batch_size: int, device: torch.device):
    """Yield (rows {column: array}, normalised images [b, C, R, R]) chunk by chunk."""
    from raydiology.data.pipeline import preprocess_batch, to_model_input

    for start in range(0, table.num_rows, batch_size):
        chunk = table.slice(start, batch_size)
        rows = {n: chunk.column(n).to_numpy(zero_copy_only=False) for n in chunk.column_names}
        pixels = preprocess_batch(rows, data=data, label_columns=[])["image"]
        yield rows, to_model_input(torch.from_numpy(pixels).to(device), data, dtype=torch.float32)


def data_config(model: Any) -> Any:
    """How to feed a model loaded by `load_medvill`: a DataConfig from its `.spec`."""
    from raydiology.config import DataConfig
    from raydiology.config_base import from_dict

    spec = model.spec
    section = {"resolution": spec["image_size"], "channels": spec["in_chans"],
               "mean": spec["mean"], "std": spec["std"]}  # fmt: skip
    return from_dict(DataConfig, section, "data")


def retrieval_on_split(
    model: Any,
    corpus: str | Path,
    data: Any,
    *,
    split: str | None = "test",
    limit: int | None = None,
    report_column: str = "report",
    relevance: str = "labels",
    label_columns: Sequence[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`evaluate_retrieval` on a corpus split; `data` is the DataConfig images are fed with.
    `relevance` "labels" (the paper's) counts by `label_columns` (default the pretraining
    objective's), "text" by report text (see the module doc)."""
    if relevance not in RELEVANCE:
        raise ValueError(f"relevance {relevance!r} is not one of {', '.join(RELEVANCE)}")
    table = read_split(corpus, split, limit=limit)
    labels = None
    if relevance == "labels":
        label_columns = label_columns or LABEL_COLUMNS
        missing = [c for c in label_columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{corpus}: no label column {', '.join(missing)} for relevance")
        labels = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float32)
                           for c in label_columns], axis=1)  # fmt: skip
    was_training = model.training
    model.eval()
    feats, positions = [], []
    for _, x in iter_images(table, data, batch_size=32, device=_device(model)):
        f, p = visual_features(model, x)
        feats.append(f)
        positions.append(p)
    model.train(was_training)
    reports = [str(r or "") for r in table.column(report_column).to_pylist()]
    result = retrieval_from_features(
        model, torch.cat(feats), torch.cat(positions), reports, labels=labels, **kwargs
    )
    return {"corpus": str(corpus), "split": split, **result}


def generate_on_split(
    model: Any,
    corpus: str | Path,
    data: Any,
    *,
    split: str | None = "test",
    out: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    report_column: str = "report",
    **kwargs: Any,
) -> list[dict[str, str]]:
    """A report per image of the split; rows {"id", "reference", "prediction"}, written to
    `out` as the JSON Lines `raydiology eval` scores (when given)."""
    table = read_split(corpus, split, limit=limit)
    rows: list[dict[str, str]] = []
    for batch, x in iter_images(table, data, batch_size=batch_size, device=_device(model)):
        predictions = generate_reports(model, x, batch_size=batch_size, **kwargs)
        for image_id, report, prediction in zip(
            batch["image_id"], batch[report_column], predictions, strict=True
        ):
            reference = reference_text(model, str(report or ""))
            rows.append({"id": str(image_id), "reference": reference, "prediction": prediction})
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


# ----------------------------------------------------------------------------- runs


def _run_dir(run_or_export_dir: str | Path) -> Path:
    from raydiology.models.medvill import find_medvill_export

    export = find_medvill_export(run_or_export_dir)
    return export.parent if export.name == "export" else export


def retrieval_run(
    run_or_export_dir: str | Path,
    corpus: str | Path,
    *,
    split: str | None = "test",
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    relevance: str = "labels",
    **kwargs: Any,
) -> dict[str, Any]:
    """`retrieval_on_split` for a MedViLL run or export (`load_medvill`); also written as
    JSON to `out` (default RUN/eval/medvill_retrieval.json), whose path is under "json".
    `relevance="labels"` (default) counts by the label columns the exported objective
    trained with; "text" by report text. The attention mask (`scheme`) defaults to the one the
    exported objective fine-tuned with (`medvill_retrieval`: bi), else the model's."""
    from raydiology.models.medvill import MEDVILL_SPEC, find_medvill_export, load_medvill

    if relevance not in RELEVANCE:
        raise ValueError(f"relevance {relevance!r} is not one of {', '.join(RELEVANCE)}")
    spec = json.loads((find_medvill_export(run_or_export_dir) / MEDVILL_SPEC).read_text())
    if kwargs.get("scheme") is None:
        kwargs["scheme"] = spec.get("objective", {}).get("attention")
    if relevance == "labels" and not kwargs.get("label_columns"):
        columns = spec.get("objective", {}).get("label_columns")
        if not columns:
            raise ValueError(f"{run_or_export_dir}: the export names no label_columns; "
                             "relevance by labels needs them")  # fmt: skip
        kwargs["label_columns"] = columns
    model = load_medvill(run_or_export_dir, device=device)
    result = retrieval_on_split(
        model, corpus, data_config(model), split=split, relevance=relevance, **kwargs
    )
    path = Path(out) if out is not None else _run_dir(run_or_export_dir) / "eval"
    path = path / "medvill_retrieval.json" if out is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return {**result, "json": str(path)}


def generate_run(
    run_or_export_dir: str | Path,
    corpus: str | Path,
    *,
    split: str | None = "test",
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> tuple[list[dict[str, str]], Path]:
    """`generate_on_split` for a MedViLL run or export; writes `out` (default
    RUN/eval/medvill_predictions.jsonl) and returns (rows, path)."""
    from raydiology.models.medvill import load_medvill

    model = load_medvill(run_or_export_dir, device=device)
    path = (
        Path(out)
        if out is not None
        else _run_dir(run_or_export_dir) / "eval" / "medvill_predictions.jsonl"
    )
    rows = generate_on_split(model, corpus, data_config(model), split=split, out=path, **kwargs)
    return rows, path
