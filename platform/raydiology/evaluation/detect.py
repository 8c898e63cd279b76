"""Frozen-encoder localisation: a DETR-style decoder on patch features, scored by mAP@50.

DETR (Carion et al. 2020, "End-to-End Object Detection with Transformers"): learned object
queries attend to the image features through a transformer decoder; each query predicts a
class (or "no object") and a box; training matches queries to the true boxes one-to-one
(Hungarian matching, `scipy.optimize.linear_sum_assignment`) on a cost of class probability,
L1 and generalised IoU, then applies cross-entropy to every query and L1 + GIoU to the
matched ones. Here the backbone is a frozen raydiology export (`evaluation.dense`): only
the decoder learns, which makes it an evaluation of the encoder's patch features.

Values from facebookresearch/detr `main.py` defaults: hidden 256, 8 heads, dropout 0.1,
matcher costs class 1 / L1 5 / GIoU 2, loss weights CE 1 / L1 5 / GIoU 2, no-object weight
0.1 (`eos_coef`), AdamW lr 1e-4 and weight decay 1e-4, gradient clipping at norm 0.1.
Choices of this module (no source; say so when comparing):
- 3 decoder layers (DETR: 6 plus a 6-layer encoder; "a few" on frozen features), FFN 1024
  (DETR: 2048), 10 queries (DETR: 100 for COCO's up to ~60 objects; radiograph findings are
  few per image), a learned positional embedding of the patch grid added to the features
  (DETR's "learned" option; its default is a sine embedding), queries as the decoder's
  input rather than as positional terms added in every layer, no auxiliary per-layer losses;
- the frozen features are computed once (no augmentation), batch 8, validation by mAP@50
  every `eval_every` steps, the best decoder kept, early stop after `patience` validations;
- mAP@50 is torchmetrics' COCO-style average precision at IoU 0.5 (pycocotools backend),
  averaged over the classes; mean IoU is the IoU of each true box with the highest-scoring
  prediction of its class in its image (0 when there is none), averaged over the test boxes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydiology.config_base import check
from raydiology.evaluation.dense import BestSoFar, FrozenDenseEncoder
from raydiology.evaluation.features import Progress, hash_split


@dataclass(frozen=True, kw_only=True)
class DetectConfig:
    """The decoder and its training (sources: module doc)."""

    layers: int = 3
    queries: int = 10
    hidden: int = 256  # DETR
    heads: int = 8  # DETR
    ffn: int = 1024
    dropout: float = 0.1  # DETR
    cost_class: float = 1.0  # DETR matcher
    cost_l1: float = 5.0  # DETR matcher (and L1 loss weight)
    cost_giou: float = 2.0  # DETR matcher (and GIoU loss weight)
    eos_coef: float = 0.1  # DETR: weight of the "no object" class in the cross-entropy
    lr: float = 1e-4  # DETR (AdamW)
    weight_decay: float = 1e-4  # DETR
    clip_norm: float = 0.1  # DETR
    batch_size: int = 8
    max_steps: int = 2000
    eval_every: int = 100
    patience: int = 5
    seed: int = 0

    def validate(self, key: str = "detect") -> None:
        for name in ("layers", "queries", "hidden", "heads", "ffn", "batch_size", "max_steps",
                     "eval_every", "patience"):  # fmt: skip
            value = getattr(self, name)
            check(value >= 1, f"{key}.{name}", value, "at least 1")
        check(self.hidden % self.heads == 0, f"{key}.hidden", self.hidden, "a multiple of heads")
        check(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "0 <= dropout < 1")
        check(self.lr > 0, f"{key}.lr", self.lr, "a positive learning rate")
        check(0 < self.eos_coef <= 1, f"{key}.eos_coef", self.eos_coef, "0 < eos_coef <= 1")


# -- data ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class BoxSplit:
    """One split at an encoder's resolution: images uint8/uint16 [N, 1, R, R]; per image the
    true boxes [m, 4] (x0, y0, x1, y1, pixels of the R x R input) and class indices [m]."""

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    image_ids: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)


def read_box_rows(
    corpus_dir: str | os.PathLike, resolution: int, column: str = "boxes"
) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
    """The corpus's rows with a box list (an empty list counts: an image with nothing to
    find), fitted like training batches without augmentation (`preprocess_batch` with the
    box column), their ids and split (rows without `split` get `hash_split`)."""
    from raydiology.config import DataConfig
    from raydiology.data.corpus import CorpusError, read_manifest, read_rows
    from raydiology.data.pipeline import preprocess_batch

    manifest = read_manifest(corpus_dir)
    if column not in manifest.columns:
        raise CorpusError(f"{corpus_dir}: no {column!r} column (box lists); see corpus_format")
    columns = ["image_id", "pixels", "height", "width", "dtype", column]
    has_split = "split" in manifest.columns
    table = read_rows(corpus_dir, columns=[*columns, *(["split"] if has_split else [])])
    annotated = np.asarray(table.column(column).is_valid())
    batch = {c: table.column(c).to_numpy(zero_copy_only=False)[annotated] for c in columns}
    ids = [str(i) for i in batch["image_id"]]
    raw = table.column("split").to_pylist() if has_split else [None] * table.num_rows
    raw = [s for s, keep in zip(raw, annotated, strict=True) if keep]
    split = np.array([s or hash_split(i) for s, i in zip(raw, ids, strict=True)], dtype=object)
    part = preprocess_batch(batch, data=DataConfig(resolution=resolution), label_columns=[],
                            out_dtype=manifest.dtype or "uint16", box_column=column)  # fmt: skip
    return part, ids, split


def kept_boxes(part: dict[str, np.ndarray], row: int) -> tuple[Tensor, list[str], list[str]]:
    """One row's boxes [m, 4] still in the input (a crop can drop some), labels, phrases."""
    m = len(part["box_label"][row])
    keep = ~np.isnan(part["boxes"][row, :m, 0])
    boxes = torch.from_numpy(part["boxes"][row, :m][keep]).reshape(-1, 4)
    labels = [n for n, k in zip(part["box_label"][row], keep, strict=True) if k]
    phrases = [n for n, k in zip(part["box_phrase"][row], keep, strict=True) if k]
    return boxes, labels, phrases


def box_splits(
    corpus_dir: str | os.PathLike, resolution: int, column: str = "boxes"
) -> tuple[dict[str, BoxSplit], list[str]]:
    """`read_box_rows` per split, and the class names (sorted box labels)."""
    part, ids, split = read_box_rows(corpus_dir, resolution, column)
    classes = sorted({str(label) for row in part["box_label"] for label in row})
    index = {c: k for k, c in enumerate(classes)}
    out = {}
    for name in ("train", "val", "test"):
        rows = np.flatnonzero(split == name)
        boxes, labels = [], []
        for i in rows:
            kept, names, _ = kept_boxes(part, int(i))
            boxes.append(kept)
            labels.append(torch.tensor([index[n] for n in names], dtype=torch.long))
        out[name] = BoxSplit(images=torch.from_numpy(part["image"][rows]), boxes=boxes,
                             labels=labels, image_ids=[ids[i] for i in rows])  # fmt: skip
    return out, classes


# -- decoder ------------------------------------------------------------------------------


class PatchMemory(nn.Module):
    """Patch features [B, D, gh, gw] -> decoder memory [B, gh * gw, hidden]: DETR's input
    projection (a 1x1 conv) plus a learned position embedding of the grid."""

    def __init__(self, dim: int, hidden: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, hidden, 1)
        self.pos = nn.Parameter(torch.zeros(1, grid[0] * grid[1], hidden))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, feats: Tensor) -> Tensor:
        return self.proj(feats).flatten(2).transpose(1, 2) + self.pos


def box_mlp(hidden: int) -> nn.Sequential:
    """DETR's 3-layer box head: hidden -> 4 logits (sigmoid: cxcywh fractions)."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, 4))  # fmt: skip


def transformer_decoder(
    layers: int, hidden: int, heads: int, ffn: int, dropout: float
) -> nn.Module:
    layer = nn.TransformerDecoderLayer(hidden, heads, ffn, dropout, batch_first=True)
    return nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(hidden))


class DetrDecoder(nn.Module):
    """Patch features [B, D, gh, gw] -> class logits [B, Q, K + 1] (last: no object) and
    boxes [B, Q, 4] (centre x, centre y, width, height as fractions of the image)."""

    def __init__(self, dim: int, classes: int, grid: tuple[int, int], cfg: DetectConfig) -> None:
        super().__init__()
        self.memory = PatchMemory(dim, cfg.hidden, grid)
        self.queries = nn.Embedding(cfg.queries, cfg.hidden)
        self.decoder = transformer_decoder(cfg.layers, cfg.hidden, cfg.heads, cfg.ffn, cfg.dropout)
        self.classify = nn.Linear(cfg.hidden, classes + 1)
        self.box = box_mlp(cfg.hidden)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        memory = self.memory(feats)
        queries = self.queries.weight.unsqueeze(0).expand(feats.shape[0], -1, -1)
        out = self.decoder(queries, memory)
        return self.classify(out), self.box(out).sigmoid()


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


# -- matching and loss --------------------------------------------------------------------


@torch.no_grad()
def hungarian_match(
    logits: Tensor, boxes: Tensor, labels: list[Tensor], targets: list[Tensor], cfg: DetectConfig
) -> list[tuple[Tensor, Tensor]]:
    """Per image, (query indices, target indices) of the minimum-cost one-to-one matching.
    logits [B, Q, K + 1], boxes [B, Q, 4] cxcywh; targets [m, 4] cxcywh (fractions)."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import generalized_box_iou

    prob = logits.softmax(-1)
    out = []
    for b, (cls, tgt) in enumerate(zip(labels, targets, strict=True)):
        if not len(tgt):
            out.append((torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)))
            continue
        cost = (
            -cfg.cost_class * prob[b][:, cls]
            + cfg.cost_l1 * torch.cdist(boxes[b], tgt, p=1)
            - cfg.cost_giou * generalized_box_iou(cxcywh_to_xyxy(boxes[b]), cxcywh_to_xyxy(tgt))
        )
        q, t = linear_sum_assignment(cost.float().cpu().numpy())
        out.append((torch.as_tensor(q, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)))
    return out


def detr_loss(
    logits: Tensor, boxes: Tensor, labels: list[Tensor], targets: list[Tensor], cfg: DetectConfig
) -> dict[str, Tensor]:
    """DETR's set loss: cross-entropy over every query (unmatched ones -> no object, weighted
    `eos_coef`), L1 and 1 - GIoU over matched pairs, each divided by the number of boxes."""
    from torchvision.ops import generalized_box_iou

    matches = hungarian_match(logits, boxes, labels, targets, cfg)
    classes = logits.shape[-1] - 1
    target_cls = torch.full(logits.shape[:2], classes, dtype=torch.long, device=logits.device)
    pred, true = [], []
    for b, (q, t) in enumerate(matches):
        target_cls[b, q.to(logits.device)] = labels[b][t].to(logits.device)
        pred.append(boxes[b, q.to(logits.device)])
        true.append(targets[b][t].to(logits.device))
    weight = torch.ones(classes + 1, device=logits.device)
    weight[-1] = cfg.eos_coef
    ce = F.cross_entropy(logits.transpose(1, 2), target_cls, weight=weight)
    n = max(1, sum(len(t) for t in targets))
    pred_t, true_t = torch.cat(pred), torch.cat(true)
    l1 = F.l1_loss(pred_t, true_t, reduction="sum") / n
    giou = generalized_box_iou(cxcywh_to_xyxy(pred_t), cxcywh_to_xyxy(true_t))
    giou_loss = (1 - torch.diagonal(giou)).sum() / n
    total = ce + cfg.cost_l1 * l1 + cfg.cost_giou * giou_loss
    return {"loss": total, "ce": ce.detach(), "l1": l1.detach(), "giou": giou_loss.detach()}


# -- features, prediction, metrics -------------------------------------------------------


@torch.no_grad()
def encode_split(
    encoder: FrozenDenseEncoder,
    images: Tensor,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """The frozen encoder's last-layer patch maps [N, D, gh, gw] (float32, on the CPU) of
    integer images [N, 1, R, R]."""
    from raydiology.data.pipeline import to_model_input

    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size].to(device), encoder.data,
                           dtype=torch.float32)  # fmt: skip
        out.append(encoder(x)["last"].float().cpu())
    gh, gw = encoder.grid
    return torch.cat(out) if out else torch.zeros(0, encoder.embed_dim, gh, gw)


@torch.no_grad()
def predict_boxes(
    decoder: DetrDecoder,
    feats: Tensor,
    resolution: int,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> list[dict[str, Tensor]]:
    """Per image, every query's box (xyxy pixels), score (its best class's probability) and
    label: torchmetrics' prediction format."""
    decoder.eval()
    out = []
    for start in range(0, len(feats), batch_size):
        logits, boxes = decoder(feats[start : start + batch_size].to(device))
        prob = logits.softmax(-1)[..., :-1]
        scores, labels = prob.max(-1)
        xyxy = (cxcywh_to_xyxy(boxes) * resolution).clamp(0, resolution)
        out += [{"boxes": xyxy[i].cpu(), "scores": scores[i].cpu(), "labels": labels[i].cpu()}
                for i in range(len(boxes))]  # fmt: skip
    return out


def box_metrics(preds: list[dict[str, Tensor]], split: BoxSplit) -> dict[str, Any]:
    """mAP@50 (torchmetrics, per class and averaged) and mean IoU (module doc)."""
    from torchmetrics.detection import MeanAveragePrecision
    from torchvision.ops import box_iou

    metric = MeanAveragePrecision(box_format="xyxy", iou_thresholds=[0.5], class_metrics=True)
    targets = [{"boxes": b, "labels": c} for b, c in zip(split.boxes, split.labels, strict=True)]
    metric.update(preds, targets)
    result = metric.compute()
    ious = []
    for pred, true, cls in zip(preds, split.boxes, split.labels, strict=True):
        for box, label in zip(true, cls, strict=True):
            mine = pred["labels"] == label
            if not mine.any():
                ious.append(0.0)
                continue
            best = int(torch.argmax(torch.where(mine, pred["scores"], -1.0)))
            ious.append(float(box_iou(box[None], pred["boxes"][best][None])[0, 0]))
    per_class = result["map_per_class"].flatten().tolist()
    classes = result["classes"].flatten().tolist()
    map50 = float(result["map_50"])
    by_class = {
        int(c): (None if v < 0 else float(v)) for c, v in zip(classes, per_class, strict=True)
    }
    return {
        "map50": None if map50 < 0 else map50,  # -1: no true box to score against
        "map50_per_class": by_class,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "boxes": len(ious),
    }


# -- training -----------------------------------------------------------------------------


def train_detector(
    encoder: FrozenDenseEncoder,
    splits: dict[str, BoxSplit],
    classes: list[str],
    cfg: DetectConfig,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[DetrDecoder, dict[str, Any], dict[str, Tensor]]:
    """Train the decoder on the train split's frozen features, validating by mAP@50 on the
    val split; returns the best decoder, the training log and each split's features."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, val = splits["train"], splits["val"]
    if not sum(len(b) for b in train.boxes):
        raise ValueError("no boxes in the train split")
    feats = {k: encode_split(encoder, v.images, device=device) for k, v in splits.items()}
    res = train.images.shape[-1]
    targets = [xyxy_to_cxcywh(b / res) for b in train.boxes]
    decoder = DetrDecoder(encoder.embed_dim, len(classes), encoder.grid, cfg).to(device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    check_on = ("val", val) if len(val) else ("train", train)
    kept, history, step = BestSoFar(cfg.patience), [], 0
    with Progress(enabled=progress, description="detection head", total=cfg.max_steps) as bar:
        for step in range(1, cfg.max_steps + 1):
            bar.advance()
            decoder.train()
            rows = torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()
            logits, boxes = decoder(feats["train"][rows].to(device))
            losses = detr_loss(logits, boxes, [train.labels[i] for i in rows],
                               [targets[i] for i in rows], cfg)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.clip_norm)
            opt.step()
            if step % cfg.eval_every and step != cfg.max_steps:
                continue
            preds = predict_boxes(decoder, feats[check_on[0]], res, device=device)
            score = box_metrics(preds, check_on[1])["map50"] or 0.0
            history.append({"step": step, "loss": losses["loss"].item(), "val_map50": score})
            if kept.update(score, decoder):
                break
    kept.restore(decoder)
    decoder.eval()
    return decoder, {"steps": step, "best_val_map50": kept.score, "history": history}, feats


def detect_encoder(
    encoder: FrozenDenseEncoder,
    splits: dict[str, BoxSplit],
    classes: list[str],
    cfg: DetectConfig,
    *,
    name: str,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[dict[str, Any], DetrDecoder, list[dict[str, Tensor]]]:
    """Train a decoder and score it on the test split: the result row, the decoder and its
    test predictions."""
    decoder, log, feats = train_detector(
        encoder, splits, classes, cfg, device=device, progress=progress
    )
    test = splits["test"]
    preds = predict_boxes(decoder, feats["test"], test.images.shape[-1], device=device)
    scores = box_metrics(preds, test)
    result = {
        "encoder": name,
        "classes": classes,
        "map50": scores["map50"],
        "map50_per_class": {classes[k]: v for k, v in scores["map50_per_class"].items()},
        "mean_iou": scores["mean_iou"],
        "test_boxes": scores["boxes"],
        "n": {k: len(v) for k, v in splits.items()},
        "steps": log["steps"],
        "best_val_map50": log["best_val_map50"],
        "history": log["history"],
        "config": asdict(cfg),
    }
    return result, decoder, preds


def save_box_picture(
    rows: list[tuple[str, list[dict[str, Tensor]]]],
    split: BoxSplit,
    classes: list[str],
    path: Any,
    *,
    images: int = 4,
    caption: str | None = None,
) -> None:
    """A grid: test images with boxes (rows), the true boxes (green) then each encoder's
    (columns) highest-scoring box of every true class, labelled with its score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    chosen = [i for i in range(len(split)) if len(split.boxes[i])][:images]
    if not chosen:
        return
    scale = 255.0 if split.images.dtype == torch.uint8 else 65535.0
    cols = 1 + len(rows)
    fig, axes = plt.subplots(len(chosen), cols, figsize=(2.6 * cols, 2.6 * len(chosen)),
                             squeeze=False)  # fmt: skip

    def draw(ax: Any, box: Tensor, colour: str, text: str | None = None) -> None:
        x0, y0, x1, y1 = box.tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=1.2))
        if text:
            ax.text(x0, y0 - 1, text, color=colour, fontsize=6)

    for r, i in enumerate(chosen):
        image = split.images[i, 0].float().numpy() / scale
        for c in range(cols):
            axes[r, c].imshow(image, cmap="gray", vmin=0, vmax=1)
            for box in split.boxes[i]:
                draw(axes[r, c], box, "lime")
        axes[r, 0].set_title("truth", fontsize=8)
        for c, (name, preds) in enumerate(rows, start=1):
            pred = preds[i]
            for label in split.labels[i].unique():
                mine = pred["labels"] == label
                if mine.any():
                    best = int(torch.argmax(torch.where(mine, pred["scores"], -1.0)))
                    score = float(pred["scores"][best])
                    draw(axes[r, c], pred["boxes"][best], "red", f"{score:.2f}")
            axes[r, c].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    legend = f"green: truth, red: top prediction per class ({', '.join(classes)})"
    fig.suptitle(legend + (f"\n{caption}" if caption else ""), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
