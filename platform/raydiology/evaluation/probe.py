"""Frozen-feature probe: a 3-layer MLP on precomputed encoder features.

For each training fraction (1% / 10% / 100% of the train split) and each seed the probe is
trained from scratch on a subset of the train split, early-stopped on the whole val split and
scored on the whole test split: AUROC per label (and their mean) and MCC, then mean ± std over
seeds. The subsets depend only on the labels, the fraction and the seed, never on the
encoder, so every encoder is probed on exactly the same images.

Two named protocols (`PROTOCOLS`, `ProbeConfig.of`):
- "xr0" (the default): XR-0's probe training, Adam lr 1e-4 with weight decay 1e-6, batch
  64, up to 500 epochs, the lr halved when the validation score (mean val AUROC) has not
  improved for 2 epochs, early stopping on the validation score; the patience of the early
  stop is not given by XR-0 (10 here, as raydiology-v1);
- "raydiology-v1": this platform's first protocol, kept for comparison with earlier results
  and for fast checks: no weight decay, batch 256, up to 200 epochs, plateau and early stop
  (10 epochs) on the validation loss.

Choices the protocol leaves open, fixed here:
- features are standardised with the mean/std of the whole train split (labels are what is
  scarce at 1%, not images), the same for every fraction and seed;
- multi-label (and single binary label): BCE, one sigmoid per label, MCC at probability 0.5
  averaged over labels; multi-class (one-hot label columns): CE, one-vs-rest AUROC per class,
  MCC of the arg-max (scikit-learn's multi-class MCC);
- std is the sample std over seeds (ddof=1); a label whose test split lacks a class has no
  AUROC (null) and is left out of the mean.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from raydiology.config_base import check

Task = Literal["auto", "multilabel", "multiclass"]


Monitor = Literal["score", "loss"]


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Probe training; the defaults are XR-0's protocol ("xr0" in `PROTOCOLS`)."""

    hidden_dim: int = 512
    dropout: float = 0.2
    lr: float = 1e-4  # Adam
    weight_decay: float = 1e-6  # Adam's (L2) weight decay
    batch_size: int = 64
    max_epochs: int = 500
    # What the lr plateau and the early stop watch on the val split: "score" (mean AUROC,
    # higher is better) or "loss" (lower is better)
    monitor: Monitor = "score"
    patience: int = 10  # early stop: epochs without a better val score/loss
    lr_patience: int = 2  # ReduceLROnPlateau on the same
    lr_factor: float = 0.5
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seeds: int = 5
    task: Task = "auto"  # auto: multiclass when the label columns are one-hot, else multilabel
    standardize: bool = True

    @classmethod
    def of(cls, protocol: str, **overrides: Any) -> ProbeConfig:
        """A named protocol's settings, with `overrides` (e.g. fractions, seeds) on top."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"probe protocol {protocol!r} is not one of {list(PROTOCOLS)}")
        return cls(**{**PROTOCOLS[protocol], **overrides})

    def validate(self, key: str = "probe") -> None:
        check(self.hidden_dim >= 1, f"{key}.hidden_dim", self.hidden_dim, "at least 1")
        check(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "0 <= dropout < 1")
        check(self.lr > 0, f"{key}.lr", self.lr, "a positive learning rate")
        check(self.weight_decay >= 0, f"{key}.weight_decay", self.weight_decay, ">= 0")
        check(self.monitor in ("score", "loss"), f"{key}.monitor", self.monitor, "score or loss")
        check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "at least 1")
        check(self.max_epochs >= 1, f"{key}.max_epochs", self.max_epochs, "at least 1")
        check(self.patience >= 1, f"{key}.patience", self.patience, "at least 1")
        check(self.lr_patience >= 0, f"{key}.lr_patience", self.lr_patience, "0 or more")
        check(0 < self.lr_factor < 1, f"{key}.lr_factor", self.lr_factor, "0 < factor < 1")
        check(
            len(self.fractions) > 0 and all(0 < f <= 1 for f in self.fractions),
            f"{key}.fractions",
            list(self.fractions),
            "fractions of the train split in (0, 1]",
        )
        check(self.seeds >= 1, f"{key}.seeds", self.seeds, "at least 1")
        check(
            self.task in ("auto", "multilabel", "multiclass"),
            f"{key}.task",
            self.task,
            "auto, multilabel or multiclass",
        )


# Named probe protocols: ProbeConfig fields that differ from its defaults (XR-0's).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "xr0": {},
    "raydiology-v1": {
        "weight_decay": 0.0, "batch_size": 256, "max_epochs": 200, "monitor": "loss",
    },
}  # fmt: skip


class MLPProbe(nn.Module):
    """features [B, D] -> logits [B, K]: Linear-ReLU-Dropout, twice, then Linear."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def fraction_name(fraction: float) -> str:
    """0.01 -> "1%", 1.0 -> "100%", 0.005 -> "0.5%" (JSON keys and table columns)."""
    return f"{fraction * 100:g}%"


def infer_task(labels: np.ndarray, task: Task = "auto") -> str:
    """labels [N, L] 0/1 -> "multiclass" when one-hot over >= 2 columns, else "multilabel"."""
    one_hot = labels.shape[1] >= 2 and bool(np.all(labels.sum(axis=1) == 1))
    if task == "multiclass" and not one_hot:
        raise ValueError("task multiclass needs one-hot label columns (exactly one 1 per row)")
    if task != "auto":
        return task
    return "multiclass" if one_hot else "multilabel"


def training_subset(labels: np.ndarray, fraction: float, seed: int, task: str) -> np.ndarray:
    """Indices into the train rows for one (fraction, seed): sorted, deterministic.

    A seeded permutation of the train rows; the first round(fraction * n) (at least 1) are
    taken, so a smaller fraction is a subset of a larger one for the same seed. Then, where
    the train split has them, the first rows (in that permutation) of any missing class are
    added: a positive and a negative of every label (multi-label), one row of every class
    (multi-class).
    """
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    take = max(1, round(fraction * n))
    chosen = set(order[:take].tolist())
    if task == "multiclass":
        needs = [labels[:, j] == 1 for j in range(labels.shape[1])]
    else:
        needs = [labels[:, j] == v for j in range(labels.shape[1]) for v in (1, 0)]
    for has in needs:
        if has.any() and not any(has[i] for i in chosen):
            chosen.add(int(next(i for i in order if has[i])))
    return np.array(sorted(chosen), dtype=np.int64)


def _loss_fn(task: str) -> nn.Module:
    return nn.CrossEntropyLoss() if task == "multiclass" else nn.BCEWithLogitsLoss()


def _targets(y: np.ndarray, task: str) -> torch.Tensor:
    if task == "multiclass":
        return torch.from_numpy(y.argmax(axis=1)).long()
    return torch.from_numpy(y.astype(np.float32))


def train_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    task: str,
    cfg: ProbeConfig,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[MLPProbe, dict[str, Any]]:
    """Train one probe; returns it with the weights of its best val epoch (on `cfg.monitor`),
    and a log.

    x [n, D] float32, y [n, L] 0/1. Deterministic given the seed (init, shuffling, dropout).
    """
    device = torch.device(device)
    fork = [device] if device.type == "cuda" else []
    higher = cfg.monitor == "score"
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        model = MLPProbe(
            x_train.shape[1], y_train.shape[1], hidden_dim=cfg.hidden_dim, dropout=cfg.dropout
        ).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="max" if higher else "min",
            factor=cfg.lr_factor,
            patience=cfg.lr_patience,
        )
        loss_fn = _loss_fn(task)
        xt = torch.from_numpy(x_train).float().to(device)
        yt = _targets(y_train, task).to(device)
        xv = torch.from_numpy(x_val).float().to(device)
        yv = _targets(y_val, task).to(device)
        shuffle = torch.Generator().manual_seed(seed)

        best = -math.inf if higher else math.inf
        best_epoch, best_loss, best_score = -1, math.inf, None
        best_state = copy.deepcopy(model.state_dict())
        epoch = 0
        for epoch in range(cfg.max_epochs):
            model.train()
            for idx in torch.randperm(len(xt), generator=shuffle).split(cfg.batch_size):
                idx = idx.to(device)
                loss = loss_fn(model(xt[idx]), yt[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                logits = model(xv)
                val_loss = float(loss_fn(logits, yv))
            val_score = mean_auroc(y_val, _probabilities(logits, task)) if higher else None
            if not higher:
                value = val_loss
            elif val_score is not None:
                value = val_score
            else:  # no label has both classes in val (so never, for this split)
                value = -val_loss
            scheduler.step(value)
            if (value > best) if higher else (value < best):
                best, best_epoch, best_loss, best_score = value, epoch, val_loss, val_score
                best_state = copy.deepcopy(model.state_dict())
            elif epoch - best_epoch >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    log = {
        "epochs": epoch + 1,
        "best_epoch": best_epoch + 1,
        "monitor": cfg.monitor,
        "best_val_loss": best_loss if math.isfinite(best_loss) else None,
        "best_val_score": best_score,
        "final_lr": optimizer.param_groups[0]["lr"],
    }
    return model, log


def _probabilities(logits: torch.Tensor, task: str) -> np.ndarray:
    """Softmax (multi-class) or per-label sigmoid, [n, L] float64 on the CPU."""
    probs = logits.softmax(dim=1) if task == "multiclass" else logits.sigmoid()
    return probs.cpu().double().numpy()


def _aurocs(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """AUROC per label column; None where the labels hold one class only."""
    from sklearn.metrics import roc_auc_score

    return [
        float(roc_auc_score(y_true[:, j], probs[:, j]))
        if 0 < y_true[:, j].sum() < len(y_true)
        else None
        for j in range(y_true.shape[1])
    ]


def _mean(values: list[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return float(np.mean(scored)) if scored else None


def mean_auroc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean AUROC over the label columns that hold both classes; None when none does."""
    return _mean(_aurocs(y_true, probs))


def standardize(features: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """features [N, D] -> float32, centred and scaled by the mean/std of the train rows."""
    x = features.astype(np.float32)
    mu = x[train_rows].mean(axis=0)
    sd = x[train_rows].std(axis=0)
    return (x - mu) / np.where(sd > 1e-6, sd, 1.0)


@torch.no_grad()
def predict(model: MLPProbe, x: np.ndarray, task: str) -> np.ndarray:
    """Probabilities [n, L]: softmax (multi-class) or per-label sigmoid."""
    device = next(model.parameters()).device
    return _probabilities(model(torch.from_numpy(x).float().to(device)), task)


def probe_metrics(
    y_true: np.ndarray, probs: np.ndarray, task: str, label_columns: list[str]
) -> dict[str, Any]:
    """AUROC per label (null where the labels hold one class only), their mean, and MCC."""
    from sklearn.metrics import matthews_corrcoef

    auroc = dict(zip(label_columns, _aurocs(y_true, probs), strict=True))
    out: dict[str, Any] = {"auroc": auroc, "auroc_mean": _mean(list(auroc.values()))}
    if task == "multiclass":
        out["mcc"] = float(matthews_corrcoef(y_true.argmax(1), probs.argmax(1)))
    else:
        per_label = {
            name: float(matthews_corrcoef(y_true[:, j], probs[:, j] >= 0.5))
            for j, name in enumerate(label_columns)
        }
        out["mcc_per_label"] = per_label
        out["mcc"] = float(np.mean(list(per_label.values())))
    return out


def _mean_std(values: list[float | None]) -> dict[str, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}


def run_probe(
    features: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray,
    *,
    label_columns: list[str],
    cfg: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """The whole protocol on one feature matrix.

    features [N, D], labels [N, L] 0/1 (columns = `label_columns`), split [N] of
    "train"/"val"/"test". Returns a JSON-able dict: task, split sizes and, per fraction,
    per-seed metrics plus mean/std of the mean AUROC, the MCC and each label's AUROC.
    """
    from raydiology.evaluation.features import Progress

    cfg = cfg or ProbeConfig()
    cfg.validate("probe")
    rows = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
    for s, idx in rows.items():
        if len(idx) == 0:
            raise ValueError(f"the {s} split is empty; the probe needs train, val and test rows")
    task = infer_task(labels, cfg.task)
    x = standardize(features, rows["train"]) if cfg.standardize else features.astype(np.float32)
    x_val, y_val = x[rows["val"]], labels[rows["val"]]
    x_test, y_test = x[rows["test"]], labels[rows["test"]]
    y_train_all = labels[rows["train"]]

    runs = [(f, s) for f in cfg.fractions for s in range(cfg.seeds)]
    per_run: dict[float, list[dict[str, Any]]] = {f: [] for f in cfg.fractions}
    with Progress(enabled=progress, description="probe", total=len(runs)) as bar:
        for fraction, seed in runs:
            subset = training_subset(y_train_all, fraction, seed, task)
            train_rows = rows["train"][subset]
            model, log = train_probe(
                x[train_rows],
                labels[train_rows],
                x_val,
                y_val,
                task=task,
                cfg=cfg,
                seed=seed,
                device=device,
            )
            metrics = probe_metrics(y_test, predict(model, x_test, task), task, label_columns)
            per_run[fraction].append({"seed": seed, "n_train": len(subset), **log, **metrics})
            bar.advance()

    fractions: dict[str, Any] = {}
    for fraction, seed_runs in per_run.items():
        fractions[fraction_name(fraction)] = {
            "fraction": fraction,
            "n_train": [r["n_train"] for r in seed_runs],
            "auroc_mean": _mean_std([r["auroc_mean"] for r in seed_runs]),
            "mcc": _mean_std([r["mcc"] for r in seed_runs]),
            "auroc": {c: _mean_std([r["auroc"][c] for r in seed_runs]) for c in label_columns},
            "seeds": seed_runs,
        }
    return {
        "task": task,
        "labels": list(label_columns),
        "n": {s: len(idx) for s, idx in rows.items()},
        "positives": {
            s: {c: int(labels[idx, j].sum()) for j, c in enumerate(label_columns)}
            for s, idx in rows.items()
        },
        "config": asdict(cfg) | {"fractions": list(cfg.fractions)},
        "fractions": fractions,
    }


def probe_features(
    fs: Any,
    label_columns: list[str],
    cfg: ProbeConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """`run_probe` on a `features.FeatureSet`, with who/what was probed on top."""
    result = run_probe(
        fs.features,
        fs.select(label_columns),
        fs.split,
        label_columns=label_columns,
        cfg=cfg,
        device=device,
        progress=progress,
    )
    return {
        "encoder": fs.encoder,
        "pooling": fs.pooling,
        "features_key": fs.key,
        "notes": fs.notes,
        **result,
    }
