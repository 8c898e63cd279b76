"""Issue 18, item 1: one fair ranking rule for every retrieval metric."""

from __future__ import annotations

import numpy as np
import torch

from raydiology.evaluation.clip_retrieval import random_mrr, random_recall_at, retrieval_metrics
from raydiology.evaluation.medvill_eval import candidate_metrics, random_candidate_metrics
from raydiology.evaluation.ranking import best_first
from raydiology.evaluation.retrieval import precision_at_k


def test_a_constant_scorer_gets_the_random_baseline_not_a_perfect_score():
    """Before: CLIP ranked a query 1 + the candidates scored strictly higher, so a 50 x 50
    all-ties matrix (a collapsed model) scored R@1 = R@10 = MRR = 1.0."""
    n = 200
    positives = np.eye(n, dtype=bool)
    scores = retrieval_metrics(torch.zeros(n, n), positives)
    assert scores["R@1"] < 0.05 and scores["R@10"] < 0.15
    assert abs(scores["MRR"] - random_mrr(positives)) < 0.03
    assert abs(scores["R@10"] - random_recall_at(positives, 10)) < 0.04

    relevant = torch.zeros(n, 20, dtype=torch.bool)
    relevant[:, 0] = True  # the relevant candidate first: a stable sort would rank it 1
    tied = candidate_metrics(torch.zeros(n, 20), relevant)
    assert abs(tied["MRR"] - random_candidate_metrics(relevant)["MRR"]) < 0.05

    labels = np.repeat(np.arange(4), 50)[:, None]  # gallery stored sorted by label
    ones = np.ones((n, 8))
    out = precision_at_k(ones, ones, labels, labels, ks=(1, 10), match="exact")
    assert abs(out["precision"]["10"] - out["chance"]) < 0.05


def test_ties_break_reproducibly_and_scores_still_decide():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5, 0.5]])
    order = best_first(scores)
    assert order[0, 0] == 1 and order[0, -1] == 0  # best first, worst last
    assert sorted(order[0, 1:4].tolist()) == [2, 3, 4]
    assert torch.equal(order, best_first(scores))  # seeded: a rerun ranks alike
