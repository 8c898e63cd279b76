"""MedViLL pretraining: masked language modelling + image-report matching on one sequence.

Per batch: half the samples (on average) get a negative report, taken from another sample of
the batch whose diagnosis labels differ (a sample with no such partner keeps its own report);
180 of the 256 visual positions are kept; the report tokens are masked BERT-style (15%, at
least one per report; of those 80% [MASK], 10% a random token, 10% unchanged). MLM is scored
on matched pairs only (a report does not describe a mismatched image), matching on all.

`export_extra` writes the whole pretrained MedViLL beside the encoder export (see
`export_medvill`), which `load_medvill` and `model.pretrained` read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydiology.config_base import check, to_dict
from raydiology.data.phantom import LABEL_COLUMNS
from raydiology.models.medvill import (
    MEDVILL_FORMAT,
    MEDVILL_SPEC,
    MEDVILL_TOKENIZER,
    MEDVILL_WEIGHTS,
    MedViLL,
)
from raydiology.registry import OBJECTIVES


@dataclass(kw_only=True)
class MedViLLObjectiveConfig:
    """The `objective` section for ``name: medvill``."""

    report_column: str = "report"
    # diagnosis label columns: negatives come from reports whose labels differ
    label_columns: tuple[str, ...] = LABEL_COLUMNS
    mask_prob: float = 0.15
    negative_prob: float = 0.5
    mlm_weight: float = 1.0
    itm_weight: float = 1.0

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(0 < self.mask_prob < 1, f"{k}mask_prob", self.mask_prob, "0 < p < 1")
        check(
            0 <= self.negative_prob <= 1, f"{k}negative_prob", self.negative_prob, "a probability"
        )

    def corpus_columns(self) -> dict[str, str]:
        return {"report": self.report_column, **{f"label:{c}": c for c in self.label_columns}}


def export_medvill(
    objective: nn.Module,
    folder: Path,
    *,
    write: bool,
    gather: bool,
    name: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """The objective's whole state (`model.*`: CNN, joint BERT, pretraining heads; `head.*`:
    a downstream head) as safetensors, the model's tokenizer, and medvill.json naming the
    objective (`name` + its config), so the trained model and its heads can be rebuilt.

    Every rank calls this: under ZeRO-3 (`gather`) each holds a slice of every weight and
    all take part in gathering them; only the writing rank saves. Buffers (BatchNorm
    statistics) are not partitioned and come with the state dict.
    """
    import deepspeed
    from safetensors.torch import save_file

    model = objective.model
    assert isinstance(model, MedViLL)
    params = list(objective.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=gather):
        if not write:
            return
        tensors = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in objective.state_dict().items()
        }
        counts = {  # while gathered: a ZeRO-3 partition's own numel is 0
            "model": sum(p.numel() for p in model.parameters()),
            "total": sum(p.numel() for p in params),
        }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / MEDVILL_WEIGHTS), metadata={"format": MEDVILL_FORMAT})
    model.tokenizer.save(folder / MEDVILL_TOKENIZER)
    spec = {
        "format": MEDVILL_FORMAT,
        "weights": MEDVILL_WEIGHTS,
        "tokenizer": MEDVILL_TOKENIZER,
        "objective": {"name": name, **to_dict(objective.cfg)},
        **(extra or {}),
        "parameters": counts,
        "usage": "raydiology.models.medvill.load_medvill(path) -> MedViLL (eval); "
        "raydiology.objectives.medvill_downstream.load_medvill_task(path) -> with its heads",
    }
    (folder / MEDVILL_SPEC).write_text(json.dumps(spec, indent=2))


def _uniform(*shape: int, generator: torch.Generator | None) -> Tensor:
    """U(0, 1) draws on the CPU, taken from `generator` on whatever device it lives."""
    device = generator.device if generator is not None else None
    return torch.rand(*shape, generator=generator, device=device).cpu()


def choose_negatives(
    labels: Tensor, *, prob: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """labels [B, K] -> (partner [B], matched bool [B]).

    Each sample is a negative with probability `prob`; its partner is a random other sample
    whose label vector differs. Without such a sample it stays matched (partner = itself).
    """
    b = labels.shape[0]
    labels = labels.cpu()
    differs = (labels[:, None, :] != labels[None, :, :]).any(dim=-1)  # [B, B]
    want = _uniform(b, generator=generator) < prob
    scores = _uniform(b, b, generator=generator).masked_fill(~differs, -1.0)
    best, choice = scores.max(dim=1)
    negative = want & (best >= 0)
    partner = torch.where(negative, choice, torch.arange(b))
    return partner, ~negative


def mask_tokens(
    ids: list[list[int]],
    *,
    prob: float,
    mask_id: int,
    vocab_size: int,
    special: set[int],
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """BERT masking -> (inputs, targets); targets are -100 where nothing is predicted.

    Each maskable token (not special) is chosen with probability `prob`, at least one per
    sequence (the lowest draw when none is); a chosen token becomes [MASK] (80%), a random
    token (10%) or stays (10%). One draw of [T, 3] uniforms per sequence.
    """
    inputs, targets = [], []
    for row in ids:
        x, y = list(row), [-100] * len(row)
        if row:
            u = _uniform(len(row), 3, generator=generator)
            maskable = torch.tensor([t not in special for t in row])
            chosen = maskable & (u[:, 0] < prob)
            if maskable.any() and not chosen.any():
                chosen[int(u[:, 0].masked_fill(~maskable, 2.0).argmin())] = True
            for i in chosen.nonzero().flatten().tolist():
                y[i] = row[i]
                if u[i, 1] < 0.8:
                    x[i] = mask_id
                elif u[i, 1] < 0.9:
                    x[i] = min(int(u[i, 2] * vocab_size), vocab_size - 1)
        inputs.append(x)
        targets.append(y)
    return inputs, targets


def batch_labels(batch: dict[str, Any], columns: Sequence[str]) -> Tensor:
    """The batch's ``label:<col>`` entries -> float [B, K] on the CPU (KeyError if absent)."""
    return torch.stack([torch.as_tensor(batch[f"label:{c}"]).float().cpu() for c in columns], 1)


def text_targets(model: MedViLL, segments: Tensor, targets: list[list[int]]) -> Tensor:
    """Per-row targets over the text rows -> long [B, L] on the joint sequence, -100 elsewhere.

    They sit on the text tokens after any text [CLS], where `assemble` put the inputs.
    """
    target = torch.full(segments.shape, -100, dtype=torch.long, device=segments.device)
    lead = 1 if model.cfg.attention == "noncross" else 0
    start = int((segments[0] == 1).long().argmax()) + lead  # the same for every row
    for i, row in enumerate(targets):
        target[i, start : start + len(row)] = torch.tensor(row, device=segments.device)
    return target


class MedViLLObjective(nn.Module):
    """batch {"image", "report": list[str], "label:<col>": [B]} -> {"loss", "mlm", "itm", ...}."""

    def __init__(self, cfg: MedViLLObjectiveConfig, model: MedViLL) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def export_extra(self, folder: Path, *, write: bool, gather: bool) -> None:
        """The whole pretrained MedViLL beside the encoder export (`export_medvill`)."""
        export_medvill(self, folder, write=write, gather=gather, name="medvill",
                       extra={"task": "pretraining"})  # fmt: skip

    def labels(self, batch: dict[str, Any]) -> Tensor:
        return batch_labels(batch, self.cfg.label_columns)

    def forward(
        self, batch: dict[str, Any], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        if "report" not in batch:
            raise KeyError("medvill needs batch['report'] (the corpus's report text)")
        model, tok = self.model, self.model.tokenizer
        images = batch["image"]
        partner, matched = choose_negatives(
            self.labels(batch), prob=self.cfg.negative_prob, generator=generator
        )
        reports = list(batch["report"])
        # Each report ends in [SEP], maskable here like a word, so that iterative [MASK]
        # decoding can learn where a report ends. The official pretraining never masks it
        # (data/dataset_origin.py `CXRDataset.__getitem__`: the [SEP] is appended after
        # `random_word`, with label -100); its S2S generation fine-tune does, half the time
        # (`medvill_s2s`, from downstream_task/report_generation_and_vqa/data_loader.py).
        limit = model.cfg.max_text_tokens - 1
        texts = [[*tok.encode(reports[int(j)])[:limit], tok.sep_id] for j in partner]
        inputs, targets = mask_tokens(texts, prob=self.cfg.mask_prob, mask_id=tok.mask_id,
                                      vocab_size=tok.vocab_size,
                                      special=tok.special_ids - {tok.sep_id},
                                      generator=generator)  # fmt: skip
        hidden, segments, _ = model(images, inputs, keep=model.cfg.visual_keep, generator=generator)
        device = hidden.device
        target = text_targets(model, segments, targets)
        target[~matched.to(device)] = -100
        picked = target != -100
        if picked.any():
            mlm = F.cross_entropy(model.mlm_logits(hidden[picked]), target[picked])
        else:
            # No matched pair in this micro-batch (~1 in 270 at 8 per worker): the MLM head
            # still runs, scaled by 0, so every rank's backward gives every parameter a
            # gradient and the data-parallel ranks reduce the same gradient buckets.
            mlm = model.mlm_logits(hidden[:, 0]).sum() * 0.0
        itm_logits = model.itm_head(model.pooled(hidden, segments))
        itm = F.cross_entropy(itm_logits, matched.long().to(device))
        loss = self.cfg.mlm_weight * mlm + self.cfg.itm_weight * itm
        with torch.no_grad():
            itm_acc = (itm_logits.argmax(dim=1) == matched.long().to(device)).float().mean()
        return {"loss": loss, "mlm": mlm.detach(), "itm": itm.detach(), "itm_acc": itm_acc,
                "negatives": (~matched).float().mean().to(device)}  # fmt: skip


def require_medvill(model: nn.Module, objective: str) -> MedViLL:
    """`model`, checked to be a MedViLL for the MedViLL fine-tune `objective`."""
    if not isinstance(model, MedViLL):
        raise TypeError(
            f"objective {objective!r} needs a medvill model, not {type(model).__name__}"
        )
    return model


@OBJECTIVES.register("medvill", MedViLLObjectiveConfig)
def build_medvill_objective(cfg: MedViLLObjectiveConfig, *, model: nn.Module) -> MedViLLObjective:
    if not isinstance(model, MedViLL):
        raise TypeError(f"objective 'medvill' trains a medvill model, not {type(model).__name__}")
    return MedViLLObjective(cfg, model)
