"""One ranking rule for every retrieval metric: best score first, ties in a random order.

A rank of "1 + the candidates scored strictly higher" gives a model that scores everything
alike (a collapsed embedding) rank 1 for every query, a perfect score; a stable sort keeps
the stored order among ties, which can follow the labels. Breaking ties at random (seeded,
so a rerun reproduces it) makes a constant scorer score the random-ranking baseline.
"""

from __future__ import annotations

import torch
from torch import Tensor


def best_first(scores: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """scores [Q, N] -> candidate indices [Q, N], highest score first, ties in a random order
    drawn from `generator` (default: seed 0)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    scores = scores.detach().float().cpu()
    shuffle = torch.rand(scores.shape, generator=generator).argsort(dim=1)
    order = scores.gather(1, shuffle).argsort(dim=1, descending=True, stable=True)
    return shuffle.gather(1, order)


def first_relevant_rank(
    scores: Tensor, relevant: Tensor, *, generator: torch.Generator | None = None
) -> Tensor:
    """scores [Q, N], relevant bool [Q, N] (>= 1 per row) -> rank [Q] of the first relevant
    candidate under `best_first` (1 = top)."""
    relevant = torch.as_tensor(relevant, dtype=torch.bool).cpu()
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant candidate")
    ranked = relevant.gather(1, best_first(scores, generator=generator))
    return ranked.float().argmax(dim=1) + 1
