"""MedViLL fine-tunes of the pretraining heads: retrieval (the matching head) and S2S report
generation (the MLM head), each from `model.pretrained` (a MedViLL export) or random weights.

- `medvill_retrieval` (downstream_task/retrieval/retrieval.py `train`): every image-report
  pair of the batch is a positive, and each sample also gives one negative, a pair with a
  report of other diagnosis labels: half the time its image with that report, else that
  report's image with its own report (`CXR_Retrieval_Dataset.__getitem__`). Cross-entropy on
  the matching head over all pairs, all grid positions, full (`bi`) attention: the official
  loader feeds a padding-only mask (`data_processing`).
- `medvill_s2s` (downstream_task/report_generation_and_vqa/data_loader.py
  `Preprocess4Seq2seq.__call__`): the report under the S2S mask, all grid positions; n =
  min(max_pred, max(1, round(words x mask_prob))) text positions (words or the closing
  [SEP]) become [MASK] (no random/kept tokens); with probability `sep_mask_prob` (0.5) the
  closing [SEP] is one of them, which is how iterative decoding learns to stop. MLM
  cross-entropy on the masked positions. Evaluate with `raydiology evaluate medvill-generate`.

Both export the whole model (`export_medvill`), read back by `load_medvill` and
`load_medvill_task`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydiology.config_base import check
from raydiology.data.phantom import LABEL_COLUMNS
from raydiology.models.medvill import MASK_SCHEMES, MedViLL
from raydiology.objectives.medvill import (
    _uniform,
    batch_labels,
    choose_negatives,
    export_medvill,
    require_medvill,
    text_targets,
)
from raydiology.registry import OBJECTIVES


class _MedViLLFineTune(nn.Module):
    """A MedViLL trained through its own heads; exports the whole model (`export_extra`)."""

    NAME = ""
    TASK = ""

    def __init__(self, cfg: Any, model: MedViLL) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def export_extra(self, folder: Path, *, write: bool, gather: bool) -> None:
        export_medvill(self, folder, write=write, gather=gather, name=self.NAME,
                       extra={"task": self.TASK})  # fmt: skip

    def reports(self, batch: dict[str, Any]) -> list[list[int]]:
        if "report" not in batch:
            raise KeyError(f"{self.NAME} needs batch['report'] (report_column)")
        limit = self.model.cfg.max_text_tokens
        return [self.model.tokenizer.encode(str(r))[:limit] for r in batch["report"]]


# ----------------------------------------------------------------------------- retrieval


@dataclass(kw_only=True)
class RetrievalConfig:
    """The `objective` section for ``name: medvill_retrieval``."""

    report_column: str = "report"
    # negatives are reports whose labels differ (retrieval.py: CheXpert label strings differ)
    label_columns: tuple[str, ...] = LABEL_COLUMNS
    attention: str = "bi"  # retrieval.py `data_processing`: a padding-only mask

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(bool(self.label_columns), f"{k}label_columns", self.label_columns, "a column")
        check(self.attention in MASK_SCHEMES, f"{k}attention", self.attention,
              "one of " + ", ".join(MASK_SCHEMES))  # fmt: skip

    def corpus_columns(self) -> dict[str, str]:
        return {"report": self.report_column, **{f"label:{c}": c for c in self.label_columns}}


class MedViLLRetrieval(_MedViLLFineTune):
    """batch {"image", "report", "label:<col>"} -> {"loss", "itm_acc", "negatives"}."""

    NAME = "medvill_retrieval"
    TASK = "retrieval"

    def pairs(
        self, labels: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """labels [B, K] -> (image index, report index, matched) over the B positives and
        one negative per sample that has a partner of other labels."""
        b = labels.shape[0]
        partner, alone = choose_negatives(labels, prob=1.0, generator=generator)
        has = ~alone
        own = torch.arange(b)[has]
        other = partner[has]
        swap_image = _uniform(int(has.sum()), generator=generator) < 0.5
        neg_image = torch.where(swap_image, other, own)
        neg_report = torch.where(swap_image, own, other)
        image = torch.cat([torch.arange(b), neg_image])
        report = torch.cat([torch.arange(b), neg_report])
        matched = torch.cat(
            [torch.ones(b, dtype=torch.bool), torch.zeros(len(own), dtype=torch.bool)]
        )
        return image, report, matched

    def forward(
        self, batch: dict[str, Any], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        labels = batch_labels(batch, self.cfg.label_columns)
        texts = self.reports(batch)
        image, report, matched = self.pairs(labels, generator=generator)
        feats, pos = self.model.visual_tokens(batch["image"])
        device = feats.device
        hidden, segments, _ = self.model.joint(
            feats[image.to(device)], pos[image.to(device)], [texts[int(j)] for j in report],
            scheme=self.cfg.attention,
        )  # fmt: skip
        logits = self.model.itm_head(self.model.pooled(hidden, segments))
        target = matched.long().to(device)
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == target).float().mean()
        return {"loss": loss, "itm_acc": acc,
                "negatives": (~matched).float().mean().to(device)}  # fmt: skip


@OBJECTIVES.register("medvill_retrieval", RetrievalConfig)
def build_medvill_retrieval(cfg: RetrievalConfig, *, model: nn.Module) -> MedViLLRetrieval:
    return MedViLLRetrieval(cfg, require_medvill(model, "medvill_retrieval"))


# ----------------------------------------------------------------------------- S2S


@dataclass(kw_only=True)
class S2SConfig:
    """The `objective` section for ``name: medvill_s2s``."""

    report_column: str = "report"
    mask_prob: float = 0.15  # run.sh --mask_prob 0.15
    max_pred: int = 3  # finetune.py --max_pred default: at most 3 masked per report
    sep_mask_prob: float = 0.5  # data_loader.py: "Last SEP token 50% mask prob."

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(0 < self.mask_prob < 1, f"{k}mask_prob", self.mask_prob, "0 < p < 1")
        check(self.max_pred >= 1, f"{k}max_pred", self.max_pred, ">= 1")
        check(0 <= self.sep_mask_prob <= 1, f"{k}sep_mask_prob", self.sep_mask_prob,
              "a probability")  # fmt: skip

    def corpus_columns(self) -> dict[str, str]:
        return {"report": self.report_column}


def s2s_masking(
    rows: list[list[int]],
    *,
    mask_id: int,
    mask_prob: float,
    max_pred: int,
    sep_mask_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Rows ``w_1 .. w_m [SEP]`` -> (inputs, targets, -100 where nothing is predicted).

    n = min(max_pred, max(1, round(m x mask_prob))) positions, drawn among the words and the
    [SEP], become [MASK]; with probability `sep_mask_prob` the [SEP] is forced among them
    (it then takes one of the n).
    """
    inputs, targets = [], []
    for row in rows:
        x, y = list(row), [-100] * len(row)
        n = min(max_pred, max(1, round((len(row) - 1) * mask_prob)))
        order = _uniform(len(row), generator=generator).argsort().tolist()
        if float(_uniform(1, generator=generator)) < sep_mask_prob:
            chosen = {len(row) - 1, *[i for i in order if i != len(row) - 1][: n - 1]}
        else:
            chosen = set(order[:n])
        for i in chosen:
            x[i], y[i] = mask_id, row[i]
        inputs.append(x)
        targets.append(y)
    return inputs, targets


class MedViLLS2S(_MedViLLFineTune):
    """batch {"image", "report"} -> {"loss" (MLM on the masked text), "mlm_acc", "sep_masked"}."""

    NAME = "medvill_s2s"
    TASK = "generation"

    def forward(
        self, batch: dict[str, Any], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        model, tok = self.model, self.model.tokenizer
        rows = [[*t[: model.cfg.max_text_tokens - 1], tok.sep_id] for t in self.reports(batch)]
        inputs, targets = s2s_masking(rows, mask_id=tok.mask_id, mask_prob=self.cfg.mask_prob,
                                      max_pred=self.cfg.max_pred,
                                      sep_mask_prob=self.cfg.sep_mask_prob,
                                      generator=generator)  # fmt: skip
        hidden, segments, _ = model(batch["image"], inputs, scheme="s2s")
        target = text_targets(model, segments, targets)
        picked = target != -100
        logits = model.mlm_logits(hidden[picked])
        loss = F.cross_entropy(logits, target[picked])
        with torch.no_grad():
            acc = (logits.argmax(dim=-1) == target[picked]).float().mean()
            sep = torch.tensor([float(y[-1] != -100) for y in targets], device=hidden.device)
        return {"loss": loss, "mlm_acc": acc, "sep_masked": sep.mean()}


@OBJECTIVES.register("medvill_s2s", S2SConfig)
def build_medvill_s2s(cfg: S2SConfig, *, model: nn.Module) -> MedViLLS2S:
    return MedViLLS2S(cfg, require_medvill(model, "medvill_s2s"))
