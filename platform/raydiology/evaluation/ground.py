"""Frozen-encoder phrase grounding: phrase -> box, scored by accuracy at IoU > 0.5 and mean IoU.

The task and metrics are MS-CXR's (Boecking et al. 2022, "Making the Most of Text Semantics
to Improve Biomedical Vision-Language Processing"): each (image, phrase, box) triple asks
for the box the phrase describes. The image encoder is a frozen raydiology export (its
patch features, `evaluation.dense`); the phrase embedding comes from a frozen text encoder:
a CLIP export's text tower (`models.clip.load_clip(...).encode_reports`) or a local Hugging
Face BERT folder (`BertPhraseEncoder`, e.g. CXR-BERT). Only a small head learns: the
projected phrase embedding is the single query of a transformer decoder over the projected
patch features (DETR's decoder with one text-conditioned query, Carion et al. 2020), and a
3-layer MLP regresses the box, trained with DETR's L1 (weight 5) + generalised-IoU (weight
2) box loss (facebookresearch/detr `main.py` defaults, as are AdamW lr/weight decay 1e-4 and
clipping at 0.1). Choices without a source: 2 decoder layers, hidden 256 / FFN 1024, features
computed once (no augmentation), validation by accuracy every `eval_every` steps with the
best head kept and an early stop after `patience` validations.

Input: the corpus's box lists whose entries carry a phrase (`[x0, y0, x1, y1, label,
phrase]`, docs/corpus_format.md); MS-CXR's CSV layout (image, phrase, box) reaches the
corpus through `ms_cxr_file_list` (`raydiology corpus ms-cxr`) and ingest, which fits the
boxes like the images.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydiology.config_base import check
from raydiology.evaluation.dense import BestSoFar, FrozenDenseEncoder
from raydiology.evaluation.detect import (
    PatchMemory,
    box_mlp,
    cxcywh_to_xyxy,
    encode_split,
    kept_boxes,
    read_box_rows,
    transformer_decoder,
    xyxy_to_cxcywh,
)
from raydiology.evaluation.features import Progress


@dataclass(frozen=True, kw_only=True)
class GroundConfig:
    """The grounding head and its training (sources: module doc)."""

    layers: int = 2
    hidden: int = 256  # DETR
    heads: int = 8  # DETR
    ffn: int = 1024
    dropout: float = 0.1  # DETR
    l1_weight: float = 5.0  # DETR
    giou_weight: float = 2.0  # DETR
    lr: float = 1e-4  # DETR (AdamW)
    weight_decay: float = 1e-4  # DETR
    clip_norm: float = 0.1  # DETR
    batch_size: int = 8
    max_steps: int = 2000
    eval_every: int = 100
    patience: int = 5
    seed: int = 0

    def validate(self, key: str = "ground") -> None:
        for name in ("layers", "hidden", "heads", "ffn", "batch_size", "max_steps",
                     "eval_every", "patience"):  # fmt: skip
            value = getattr(self, name)
            check(value >= 1, f"{key}.{name}", value, "at least 1")
        check(self.hidden % self.heads == 0, f"{key}.hidden", self.hidden, "a multiple of heads")
        check(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "0 <= dropout < 1")
        check(self.lr > 0, f"{key}.lr", self.lr, "a positive learning rate")


@dataclass(kw_only=True)
class PhraseSplit:
    """One split: images [N, 1, R, R] and its (image, phrase, box) triples: `image` [P]
    (row into images), `phrases` [P], `boxes` [P, 4] (x0, y0, x1, y1, pixels of the input)."""

    images: Tensor
    image_ids: list[str]
    image: Tensor
    phrases: list[str]
    boxes: Tensor

    def __len__(self) -> int:
        return len(self.phrases)


def phrase_splits(
    corpus_dir: str | os.PathLike, resolution: int, column: str = "boxes"
) -> dict[str, PhraseSplit]:
    """Every box with a phrase in the corpus's box lists, per split (`read_box_rows`)."""
    part, ids, split = read_box_rows(corpus_dir, resolution, column)
    out = {}
    for name in ("train", "val", "test"):
        rows = np.flatnonzero(split == name)
        image, phrases, boxes = [], [], []
        for k, i in enumerate(rows):
            kept, _, texts = kept_boxes(part, int(i))
            for box, text in zip(kept, texts, strict=True):
                if text:
                    image.append(k)
                    phrases.append(text)
                    boxes.append(box)
        out[name] = PhraseSplit(
            images=torch.from_numpy(part["image"][rows]),
            image_ids=[ids[i] for i in rows],
            image=torch.tensor(image, dtype=torch.long),
            phrases=phrases,
            boxes=torch.stack(boxes) if boxes else torch.zeros(0, 4),
        )
    return out


MS_CXR_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MsCxrFileList:
    """What `ms_cxr_file_list` wrote: images and phrases, and how many images had their
    boxes rescaled (a copy of another size than MS-CXR's) or were not found."""

    images: int
    phrases: int
    rescaled: int
    missing: int
    splits: dict[str, int]


def ms_cxr_file_list(
    ms_cxr_csv: str | os.PathLike,
    images: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    keep_split: bool = True,
) -> MsCxrFileList:
    """MS-CXR's annotation CSV -> an ingest file list with `path`, `boxes` and (where MS-CXR
    has them) `split` and `study_id`; ingest then fits the boxes like the images
    (docs/corpus_format.md).

    MS-CXR's CSV (PhysioNet `MS_CXR_Local_Alignment_v1.1.0.csv`) has one row per (image,
    phrase, box): `dicom_id`, `category_name`, `label_text`, `path` (the image in
    MIMIC-CXR-JPG, "files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg"), the box `x`, `y`, `w`, `h`
    in the pixels of an image `image_width` x `image_height`, and `split` (v1.1.0; v1.0.0
    has none). `images`: the MIMIC-CXR-JPG folder that `path` is relative to, or a pattern
    whose `{}` takes the dicom_id (e.g. "jpg/{}.jpg"); relative paths resolve against
    `out_csv`'s folder, as ingest reads them. An image found with another size than MS-CXR's
    (a downsized copy) gets its boxes scaled to it. `keep_split`: carry MS-CXR's split (the
    benchmark's; off: ingest's rows get the evaluations' hash split)."""
    from PIL import Image

    boxes: dict[str, list[list[Any]]] = defaultdict(list)
    meta: dict[str, dict[str, Any]] = {}
    with open(ms_cxr_csv, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            image_id = row["dicom_id"]
            if "{}" in str(images):
                path = str(images).format(image_id)
            elif row.get("path"):
                path = str(Path(images) / row["path"])
            else:
                raise ValueError(f"{ms_cxr_csv}:{line}: no `path` column: give the images as "
                                 "a pattern with {} for the dicom_id")  # fmt: skip
            width, height = row.get("image_width") or "", row.get("image_height") or ""
            size = (float(width), float(height)) if width and height else None
            entry = {"path": path, "size": size, "split": row.get("split") or None}
            if entry["split"] is not None and entry["split"] not in MS_CXR_SPLITS:
                raise ValueError(f"{ms_cxr_csv}:{line}: split {entry['split']!r} is not one of "
                                 f"{', '.join(MS_CXR_SPLITS)}")  # fmt: skip
            if meta.setdefault(image_id, entry) != entry:
                raise ValueError(f"{ms_cxr_csv}:{line}: {image_id} differs from its first row "
                                 "in path, image size or split")  # fmt: skip
            x, y, w, h = (float(row[k]) for k in ("x", "y", "w", "h"))
            label = row.get("category_name") or "finding"
            boxes[image_id].append([x, y, x + w, y + h, label, row["label_text"]])
    root = Path(out_csv).parent
    rescaled = missing = 0
    splits: dict[str, int] = defaultdict(int)
    with open(out_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "boxes", "split", "study_id"])
        for image_id, listed in sorted(boxes.items()):
            entry = meta[image_id]
            file = root / entry["path"]  # an absolute path stays itself
            if not file.is_file():
                missing += 1
            elif entry["size"] is not None:
                with Image.open(file) as image:  # reads the header only
                    width, height = image.size
                sx, sy = width / entry["size"][0], height / entry["size"][1]
                if (sx, sy) != (1.0, 1.0):
                    rescaled += 1
                    listed = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy, *b[4:]] for b in listed]
            split = entry["split"] if keep_split else None
            splits[split or "unsplit"] += 1
            study = re.search(r"/s(\d+)/", "/" + entry["path"].replace(os.sep, "/"))
            writer.writerow([entry["path"], json.dumps(listed), split or "",
                             study.group(1) if study else ""])  # fmt: skip
    phrases = sum(len(v) for v in boxes.values())
    return MsCxrFileList(images=len(boxes), phrases=phrases, rescaled=rescaled,
                         missing=missing, splits=dict(splits))  # fmt: skip


class GroundingHead(nn.Module):
    """(patch features [B, D, gh, gw], phrase embedding [B, E]) -> box [B, 4] (cxcywh,
    fractions of the image): the projected phrase queries the projected patches."""

    def __init__(self, dim: int, text_dim: int, grid: tuple[int, int], cfg: GroundConfig) -> None:
        super().__init__()
        self.memory = PatchMemory(dim, cfg.hidden, grid)
        self.text = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, cfg.hidden))
        self.decoder = transformer_decoder(cfg.layers, cfg.hidden, cfg.heads, cfg.ffn, cfg.dropout)
        self.box = box_mlp(cfg.hidden)

    def forward(self, feats: Tensor, text: Tensor) -> Tensor:
        out = self.decoder(self.text(text).unsqueeze(1), self.memory(feats))
        return self.box(out[:, 0]).sigmoid()


@torch.no_grad()
def embed_phrases(clip: Any, phrases: list[str], *, batch_size: int = 64) -> Tensor:
    """A CLIP export's text tower over the phrases -> [P, E] float32 on the CPU."""
    clip.eval()
    out = [clip.encode_reports(phrases[i : i + batch_size]).float().cpu()
           for i in range(0, len(phrases), batch_size)]  # fmt: skip
    return torch.cat(out) if out else torch.zeros(0, clip.text_proj.out_features)


TEXT_POOLS: tuple[str, ...] = ("mean", "cls")


class BertPhraseEncoder:
    """A local Hugging Face BERT folder (`save_pretrained`: config, weights, tokenizer) ->
    phrase embeddings [P, H]. Read with `local_files_only` (nothing is downloaded), never
    running the folder's own code (`trust_remote_code=False`); transformers takes the
    safetensors weights where the folder has both them and `pytorch_model.bin`.

    `pool="mean"` (the default) averages the last hidden states over the phrase's tokens
    (attention mask): for a BERT not trained to put a sentence into [CLS] (BiomedBERT,
    BioClinicalBERT), averaged tokens embed a sentence better than [CLS] (Reimers and
    Gurevych 2019, Sentence-BERT, Table 1), and they keep the location and finding words a
    box depends on. `pool="cls"` takes the [CLS] state, which CXR-BERT-specialized was
    trained to align with images (Boecking et al. 2022; its projection head is not loaded).

    A folder whose `model_type` transformers does not know but whose weights are BERT's
    (CXR-BERT's "cxr-bert": a BertForMaskedLM with its own modelling code) loads as a plain
    `BertModel`."""

    def __init__(
        self, folder: str | os.PathLike, *, pool: str = "mean", device: str | torch.device = "cpu"
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel

        if pool not in TEXT_POOLS:
            raise ValueError(f"text pool {pool!r}: expected one of {', '.join(TEXT_POOLS)}")
        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json (not a save_pretrained folder)")
        local: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
        self.folder, self.pool, self.device = folder, pool, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), **local)
        try:
            config = AutoConfig.from_pretrained(str(folder), **local)
        except ValueError:  # a model_type transformers does not know: read the folder as BERT
            config = BertConfig.from_pretrained(str(folder), local_files_only=True)
        model: Any
        if isinstance(config, BertConfig):  # no pooler: phrases are pooled here
            model = BertModel.from_pretrained(str(folder), config=config, local_files_only=True,
                                              add_pooling_layer=False)  # fmt: skip
        else:
            model = AutoModel.from_pretrained(str(folder), config=config, **local)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.max_length = min(512, int(getattr(config, "max_position_embeddings", 512)))

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, phrases: list[str], *, batch_size: int = 64) -> Tensor:
        """Phrases -> [P, H] float32 on the CPU."""
        out = []
        for i in range(0, len(phrases), batch_size):
            batch = self.tokenizer(phrases[i : i + batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")  # fmt: skip
            batch = {k: v.to(self.device) for k, v in batch.items()}
            states = self.model(**batch).last_hidden_state.float()
            if self.pool == "cls":
                out.append(states[:, 0].cpu())
                continue
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(((states * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def load_phrase_encoder(
    path: str | os.PathLike, *, pool: str = "mean", device: str | torch.device = "cpu"
) -> Any:
    """`--text-encoder PATH` -> phrases -> [P, E]: a CLIP run or export (clip.json, its text
    tower) or else a local Hugging Face BERT folder (config.json, `BertPhraseEncoder`)."""
    from raydiology.models.clip import find_clip_export, load_clip

    if pool not in TEXT_POOLS:
        raise ValueError(f"text pool {pool!r}: expected one of {', '.join(TEXT_POOLS)}")
    try:
        folder = find_clip_export(Path(path))
    except FileNotFoundError:
        if not (Path(path).expanduser() / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: neither a CLIP run/export (clip.json) nor a Hugging Face BERT "
                "folder (config.json)"
            ) from None
        return BertPhraseEncoder(path, pool=pool, device=device)
    clip = load_clip(folder, device=device)
    return lambda phrases: embed_phrases(clip, phrases)


@torch.no_grad()
def predict_phrase_boxes(
    head: GroundingHead,
    feats: Tensor,
    split: PhraseSplit,
    text: Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Boxes [P, 4] (x0, y0, x1, y1 pixels) for every triple of the split."""
    head.eval()
    res = split.images.shape[-1]
    out = []
    for start in range(0, len(split), batch_size):
        rows = split.image[start : start + batch_size]
        box = head(feats[rows].to(device), text[start : start + batch_size].to(device))
        out.append((cxcywh_to_xyxy(box) * res).clamp(0, res).cpu())
    return torch.cat(out) if out else torch.zeros(0, 4)


def grounding_metrics(pred: Tensor, truth: Tensor) -> dict[str, Any]:
    """Accuracy at IoU > 0.5 (MS-CXR's) and mean IoU over the triples."""
    from torchvision.ops import box_iou

    if not len(truth):
        return {"acc50": None, "mean_iou": None, "n": 0}
    iou = torch.diagonal(box_iou(pred, truth))
    return {"acc50": float((iou > 0.5).float().mean()), "mean_iou": float(iou.mean()),
            "n": len(truth)}  # fmt: skip


def ground_encoder(
    encoder: FrozenDenseEncoder,
    splits: dict[str, PhraseSplit],
    text: dict[str, Tensor],
    cfg: GroundConfig,
    *,
    name: str,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[dict[str, Any], Tensor]:
    """Train the head (train split), keep the best by val accuracy, score the test split:
    the result row and the test predictions. `text`: each split's phrase embeddings."""
    from torchvision.ops import generalized_box_iou

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train = splits["train"]
    if not len(train):
        raise ValueError("no phrases with boxes in the train split")
    feats = {k: encode_split(encoder, v.images, device=device) for k, v in splits.items()}
    res = train.images.shape[-1]
    target = xyxy_to_cxcywh(train.boxes / res)
    head = GroundingHead(encoder.embed_dim, text["train"].shape[1], encoder.grid, cfg).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    check_on = "val" if len(splits["val"]) else "train"
    kept, history, step = BestSoFar(cfg.patience), [], 0
    with Progress(enabled=progress, description="grounding head", total=cfg.max_steps) as bar:
        for step in range(1, cfg.max_steps + 1):
            bar.advance()
            head.train()
            rows = torch.randint(len(train), (cfg.batch_size,), generator=gen)
            box = head(feats["train"][train.image[rows]].to(device), text["train"][rows].to(device))
            true = target[rows].to(device)
            l1 = F.l1_loss(box, true)
            giou = 1 - torch.diagonal(
                generalized_box_iou(cxcywh_to_xyxy(box), cxcywh_to_xyxy(true))
            )
            loss = cfg.l1_weight * l1 + cfg.giou_weight * giou.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.clip_norm)
            opt.step()
            if step % cfg.eval_every and step != cfg.max_steps:
                continue
            split = splits[check_on]
            pred = predict_phrase_boxes(head, feats[check_on], split, text[check_on], device=device)
            metrics = grounding_metrics(pred, split.boxes)
            score = (metrics["acc50"] or 0.0) + 1e-3 * (
                metrics["mean_iou"] or 0.0
            )  # IoU breaks ties
            history.append({"step": step, "loss": loss.item(), "val_acc50": metrics["acc50"],
                            "val_mean_iou": metrics["mean_iou"]})  # fmt: skip
            if kept.update(score, head):
                break
    kept.restore(head)
    test = splits["test"]
    pred = predict_phrase_boxes(head, feats["test"], test, text["test"], device=device)
    result = {
        "encoder": name,
        **{k: v for k, v in grounding_metrics(pred, test.boxes).items() if k != "n"},
        "n": {k: len(v) for k, v in splits.items()},
        "steps": step,
        "history": history,
        "config": asdict(cfg),
    }
    return result, pred


def save_grounding_picture(
    rows: list[tuple[str, Tensor]],
    split: PhraseSplit,
    path: str | Path,
    *,
    triples: int = 4,
    caption: str | None = None,
) -> None:
    """A grid: test triples (rows) with the phrase as title, the true box (green) and each
    encoder's box (red, one column per encoder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = min(triples, len(split))
    if not n:
        return
    scale = 255.0 if split.images.dtype == torch.uint8 else 65535.0
    cols = max(1, len(rows))
    fig, axes = plt.subplots(n, cols, figsize=(2.8 * cols, 2.9 * n), squeeze=False)
    for r in range(n):
        image = split.images[split.image[r], 0].float().numpy() / scale
        for c, (name, pred) in enumerate(rows):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            for box, colour in ((split.boxes[r], "lime"), (pred[r], "red")):
                x0, y0, x1, y1 = box.tolist()
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour))
            phrase = split.phrases[r]
            ax.set_title(f"{name}\n{phrase[:48]}{'...' if len(phrase) > 48 else ''}", fontsize=6)
            ax.axis("off")
    fig.suptitle("green: truth, red: predicted" + (f"\n{caption}" if caption else ""), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
