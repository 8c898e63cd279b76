"""Subgroup bias of a frozen encoder: the yardstick's probe trained per subgroup and on all.

For a subgroup column (`sex` or `age_group`) with values g1..gk, one probe is trained on the
train rows of each subgroup and one on all train rows ("all"), each early-stopped on the val
rows of the group it was trained on, for every seed; each probe is then scored on the test
rows of every subgroup. A score is the mean AUROC over the chosen labels; with `bootstrap`
B > 0 each (probe, test subgroup) gives B scores, one per resample (with replacement) of that
subgroup's test rows, else one. So every (trained on, tested on) pair has a distribution of
seeds x max(B, 1) scores, and two distributions are compared with a two-sided Mann-Whitney U
test (`scipy.stats.mannwhitneyu`):
- "subgroup vs all": on subgroup g, the probes trained on g against the probes trained on all
  (does a probe for g alone do better or worse than the shared one?);
- "between subgroups": the probes trained on all, tested on g against tested on h (is the
  shared probe as good for every subgroup?).

What the p-values can and cannot say. With `bootstrap` 0 (the default) a distribution is the
seeds alone, on fixed test rows: the test asks whether the gap outlasts the probe's training
noise on this test set, not whether it holds for the population. Resampled scores are not
independent draws either: the more resamples, the smaller every p-value, whatever the gap.
Measured on phantoms whose age groups are drawn independently of the image (600 films,
random-initialised encoder, 5 seeds, 13-22 test rows per age group): 80+ against all gave
p = 0.016 from the seeds alone and p = 2e-14 with 20 resamples. Small subgroups make large
gaps; read p-values as a ranking of gaps, next to the subgroup sizes in the table.

The shape of the analysis (train on each subgroup and on all, test on each subgroup, repeat,
Mann-Whitney U between the score distributions) is issue 17's, which points to XR-0's
Figure 4 (Singla et al. 2025, arXiv:2509.12146). That figure and its methods text were not
in the pages searched for this code (only the abstract and introduction were), so nothing
here is checked against them: the metric (mean AUROC), the val rows used for early stopping,
the resampling and the two comparisons above are this platform's choices.

The probe is the yardstick's (`probe.train_probe`, same `ProbeConfig` protocols); features
are standardised with the whole train split, as `probe.run_probe` does. Rows whose subgroup
is null take part in the "all" probe's training but are tested in no subgroup; a subgroup
without train, val or test rows is left out with a note.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydiology.evaluation.probe import (
    ProbeConfig,
    infer_task,
    mean_auroc,
    predict,
    standardize,
    train_probe,
)

ALL = "all"  # the probe trained on every train row


def mann_whitney(a: list[float], b: list[float]) -> dict[str, Any]:
    """Two-sided Mann-Whitney U of two score lists: U (of `a`) and p, with sizes and medians.

    U and p are None where a list is empty; p is None where scipy gives NaN (every score equal).
    """
    from scipy.stats import mannwhitneyu

    out: dict[str, Any] = {
        "n_a": len(a),
        "n_b": len(b),
        "median_a": float(np.median(a)) if a else None,
        "median_b": float(np.median(b)) if b else None,
        "u": None,
        "p": None,
    }
    if a and b:
        test = mannwhitneyu(a, b, alternative="two-sided")
        out["u"] = float(test.statistic)
        out["p"] = None if math.isnan(test.pvalue) else float(test.pvalue)
    return out


def _scores(
    y: np.ndarray, probs: np.ndarray, *, bootstrap: int, seed: int, group_index: int
) -> list[float]:
    """Mean AUROC on the rows given, or on `bootstrap` resamples of them; undefined ones (a
    resample or subgroup without both classes of every label) are dropped.

    The resamples depend only on (seed, subgroup), so the probes compared on one subgroup
    are scored on the same resampled rows.
    """
    if bootstrap == 0:
        samples = [np.arange(len(y))]
    else:
        rng = np.random.default_rng([seed, group_index])
        samples = [rng.integers(len(y), size=len(y)) for _ in range(bootstrap)]
    scores = [mean_auroc(y[idx], probs[idx]) for idx in samples]
    return [s for s in scores if s is not None]


def run_bias(
    features: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray,
    groups: np.ndarray,
    *,
    label_columns: list[str],
    by: str,
    cfg: ProbeConfig | None = None,
    bootstrap: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """The whole analysis on one feature matrix.

    features [N, D], labels [N, L] 0/1, split [N] "train"/"val"/"test", groups [N] subgroup
    value or None. Returns a JSON-able dict: the subgroups and their sizes, per (trained on,
    tested on) the score list, and the Mann-Whitney comparisons.
    """
    from raydiology.evaluation.features import Progress

    cfg = cfg or ProbeConfig()
    cfg.validate("probe")
    if bootstrap < 0:
        raise ValueError(f"bootstrap {bootstrap}: expected 0 (no resampling) or more")
    task = infer_task(labels, cfg.task)
    train_all = np.flatnonzero(split == "train")
    if len(train_all) == 0:
        raise ValueError("the train split is empty")
    x = standardize(features, train_all) if cfg.standardize else features.astype(np.float32)

    def rows(group: str, part: str) -> np.ndarray:
        return np.flatnonzero((split == part) & ((groups == group) if group != ALL else True))

    notes: list[str] = []
    values = sorted({str(g) for g in groups if g is not None})
    if ALL in values:  # it names the probe trained on every row in the results
        raise ValueError(f"{by} has a subgroup named {ALL!r}, the name of the all-rows probe")
    subgroups = []
    for g in values:
        missing = [p for p in ("train", "val", "test") if len(rows(g, p)) == 0]
        if missing:
            notes.append(f"{by}={g} left out: no {', '.join(missing)} rows")
        else:
            subgroups.append(g)
    if not subgroups:
        raise ValueError(f"no {by} subgroup has train, val and test rows (values: {values})")
    unknown = int(sum(g is None for g in groups))
    if unknown:
        notes.append(f"{unknown} rows without {by}: in the all probe's training only")

    trained_on = [ALL, *subgroups]
    scores: dict[str, dict[str, list[float]]] = {t: {g: [] for g in subgroups} for t in trained_on}
    logs: dict[str, list[dict[str, Any]]] = {t: [] for t in trained_on}
    with Progress(enabled=progress, description="bias", total=len(trained_on) * cfg.seeds) as bar:
        for t in trained_on:
            train, val = rows(t, "train"), rows(t, "val")
            for seed in range(cfg.seeds):
                model, log = train_probe(
                    x[train], labels[train], x[val], labels[val],
                    task=task, cfg=cfg, seed=seed, device=device,
                )  # fmt: skip
                logs[t].append({"seed": seed, **log})
                for k, g in enumerate(subgroups):
                    test = rows(g, "test")
                    probs = predict(model, x[test], task)
                    scores[t][g] += _scores(
                        labels[test], probs, bootstrap=bootstrap, seed=seed, group_index=k
                    )
                bar.advance()

    comparisons = [
        {"kind": "subgroup vs all", "tested_on": g, "a": g, "b": ALL}
        | mann_whitney(scores[g][g], scores[ALL][g])
        for g in subgroups
    ]
    comparisons += [
        {"kind": "between subgroups", "trained_on": ALL, "a": g, "b": h}
        | mann_whitney(scores[ALL][g], scores[ALL][h])
        for g, h in combinations(subgroups, 2)
    ]
    return {
        "task": task,
        "labels": list(label_columns),
        "by": by,
        "subgroups": subgroups,
        "n": {t: {p: len(rows(t, p)) for p in ("train", "val", "test")} for t in trained_on},
        "positives_test": {
            g: {c: int(labels[rows(g, "test"), j].sum()) for j, c in enumerate(label_columns)}
            for g in subgroups
        },
        "metric": "mean AUROC over the labels",
        "bootstrap": bootstrap,
        "config": asdict(cfg) | {"fractions": list(cfg.fractions)},
        "scores": scores,  # scores[trained on][tested on]: seeds x max(bootstrap, 1) values
        "probes": logs,
        "comparisons": comparisons,
        "notes": notes,
    }


def bias_features(
    fs: Any,
    label_columns: list[str],
    by: str,
    cfg: ProbeConfig | None = None,
    *,
    bootstrap: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """`run_bias` on a `features.FeatureSet`, split by its subgroup column `by`."""
    if by not in fs.groups:
        have = ", ".join(fs.groups) or "none"
        raise ValueError(f"--by {by!r}: the corpus has no such subgroup column (it has: {have})")
    result = run_bias(
        fs.features, fs.select(label_columns), fs.split, fs.groups[by],
        label_columns=label_columns, by=by, cfg=cfg, bootstrap=bootstrap, device=device,
        progress=progress,
    )  # fmt: skip
    return {
        "encoder": fs.encoder,
        "pooling": fs.pooling,
        "features_key": fs.key,
        **result,
        "notes": fs.notes + result["notes"],
    }


def save_bias_figure(results: list[dict[str, Any]], path: str | Path) -> Path:
    """One panel per encoder: for each test subgroup, box plots of the scores of the probes
    trained on that subgroup and on all, with the Mann-Whitney p-value above each pair; the
    all-probe's p-values between subgroups below the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 1, figsize=(max(4.0, 1.6 * max(len(r["subgroups"]) for r in results)),
                                  3.2 * len(results)), squeeze=False,
    )  # fmt: skip
    for ax, r in zip(axes[:, 0], results, strict=True):
        pvalues = {
            c["tested_on"]: c["p"] for c in r["comparisons"] if c["kind"] == "subgroup vs all"
        }
        for k, g in enumerate(r["subgroups"]):
            pair = [r["scores"][g][g], r["scores"][ALL][g]]
            at = [3 * k + 1, 3 * k + 2]
            parts = ax.boxplot([p or [math.nan] for p in pair], positions=at, widths=0.8,
                               patch_artist=True)  # fmt: skip
            for box, colour in zip(parts["boxes"], ("tab:orange", "tab:blue"), strict=True):
                box.set_facecolor(colour)
            p = pvalues.get(g)
            top = max([v for v in pair[0] + pair[1] if v is not None], default=0.5)
            ax.text(3 * k + 1.5, top + 0.01, "p = -" if p is None else f"p = {p:.2g}",
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks([3 * k + 1.5 for k in range(len(r["subgroups"]))])
        ax.set_xticklabels([f"{r['by']}={g}" for g in r["subgroups"]])
        ax.set_ylabel("test AUROC (mean over labels)")
        between = [
            f"{c['a']} vs {c['b']}: p = " + ("-" if c["p"] is None else f"{c['p']:.2g}")
            for c in r["comparisons"]
            if c["kind"] == "between subgroups"
        ]
        if between:  # the blue boxes against each other
            ax.set_xlabel("trained on all, " + "; ".join(between), fontsize=8, wrap=True)
        ax.set_title(f"{r['encoder']}: trained on the subgroup (orange) or on all (blue)",
                     fontsize=9)  # fmt: skip
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
