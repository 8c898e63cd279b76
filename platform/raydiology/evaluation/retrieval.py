"""Image retrieval with frozen embeddings: Precision@k by label agreement.

Queries are the test split, the gallery is the train split (a retrieval database of seen
images, the usual set-up; no query can retrieve itself). Items are ranked by cosine
similarity of the pooled features, ties in a seeded random order (`evaluation.ranking`). A
retrieved item is relevant when its labels agree with the query's:
- "any" (default, XR-0's relevance: the same disease is present): the two share at least
  one positive label (a query with no positive label has no relevant items and scores 0);
- "exact" (raydiology-v1's): the whole label vector is equal. Every query, normal films
  included, has relevant items, but a query must match every finding at once.
`chance` is the expected precision of a random ranking: the mean share of relevant gallery
items per query.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from raydiology.evaluation.ranking import best_first

Match = Literal["exact", "any"]
MATCHES: tuple[str, ...] = ("any", "exact")
DEFAULT_KS = (5, 10, 100)


def relevance(q_labels: np.ndarray, g_labels: np.ndarray, match: str) -> torch.Tensor:
    """q_labels [Q, L], g_labels [G, L] 0/1 -> relevant [Q, G] bool."""
    q = torch.from_numpy(np.ascontiguousarray(q_labels, dtype=np.float64))
    g = torch.from_numpy(np.ascontiguousarray(g_labels, dtype=np.float64))
    if match == "any":
        return (q @ g.T) > 0
    if match == "exact":
        # equal 0/1 vectors <=> no position differs: |q - g|^2 summed = q.q + g.g - 2 q.g = 0
        diff = (q * q).sum(1, keepdim=True) + (g * g).sum(1)[None] - 2 * (q @ g.T)
        return diff.abs() < 0.5
    raise ValueError(f"match {match!r} is not one of {MATCHES}")


def precision_at_k(
    queries: np.ndarray,
    gallery: np.ndarray,
    q_labels: np.ndarray,
    g_labels: np.ndarray,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    match: str = "any",
    chunk: int = 1024,
) -> dict[str, Any]:
    """Mean Precision@k over queries; queries [Q, D], gallery [G, D].

    A k larger than the gallery is cut to the gallery size (reported as `k_used`).
    """
    if match not in MATCHES:
        raise ValueError(f"match {match!r} is not one of {MATCHES}")
    if len(queries) == 0 or len(gallery) == 0:
        raise ValueError("retrieval needs at least one query and one gallery item")
    g = torch.nn.functional.normalize(torch.from_numpy(gallery).double(), dim=1)
    k_used = {k: min(k, len(gallery)) for k in ks}
    top = max(k_used.values())
    hits = {k: 0.0 for k in ks}
    chance = 0.0
    ties = torch.Generator().manual_seed(0)
    step = max(1, min(chunk, (1 << 24) // len(gallery)))  # [c, G] doubles stay ~128 MB
    for start in range(0, len(queries), step):
        q = torch.nn.functional.normalize(
            torch.from_numpy(queries[start : start + step]).double(), dim=1
        )
        rel = relevance(q_labels[start : start + step], g_labels, match)  # [c, G]
        sims = q @ g.T  # [c, G]
        order = best_first(sims, generator=ties)[:, :top]  # ties in a random order
        ranked = torch.gather(rel, 1, order).double()  # [c, top]
        for k in ks:
            hits[k] += float(ranked[:, : k_used[k]].mean(dim=1).sum())
        chance += float(rel.double().mean(dim=1).sum())
    n = len(queries)
    return {
        "precision": {str(k): hits[k] / n for k in ks},
        "k_used": {str(k): k_used[k] for k in ks},
        "chance": chance / n,
    }


def run_retrieval(
    features: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray,
    *,
    label_columns: list[str],
    ks: tuple[int, ...] = DEFAULT_KS,
    match: str = "any",
) -> dict[str, Any]:
    """Test-split queries against the train-split gallery; features [N, D], labels [N, L]."""
    q_rows, g_rows = np.flatnonzero(split == "test"), np.flatnonzero(split == "train")
    out = precision_at_k(
        features[q_rows], features[g_rows], labels[q_rows], labels[g_rows], ks=ks, match=match
    )
    return {
        "labels": list(label_columns),
        "match": match,
        "queries": "test",
        "gallery": "train",
        "n_queries": len(q_rows),
        "n_gallery": len(g_rows),
        **out,
    }


def retrieve_features(
    fs: Any, label_columns: list[str], *, ks: tuple[int, ...] = DEFAULT_KS, match: str = "any"
) -> dict[str, Any]:
    """`run_retrieval` on a `features.FeatureSet`, with who/what was evaluated on top."""
    result = run_retrieval(
        fs.features,
        fs.select(label_columns),
        fs.split,
        label_columns=label_columns,
        ks=ks,
        match=match,
    )
    return {
        "encoder": fs.encoder,
        "pooling": fs.pooling,
        "features_key": fs.key,
        "notes": fs.notes,
        **result,
    }
