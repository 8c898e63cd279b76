"""MedViLL downstream fine-tuning: diagnosis classification and VQA, heads on the pooled [CLS].

Both start from `model.pretrained` (a MedViLL export) or, with it null, from random weights:
the paper's "fine-tuning only" baseline, same model and recipe without pretraining. All 256
grid positions are used (no visual dropping) and the attention mask is the objective's
`attention` (default ``bi``), as the official fine-tuning code does for understanding tasks:
its classifier attends over everything, its VQA runs with ``bi_prob 1, s2s_prob 0``.

- `medvill_diagnosis`: one sigmoid logit per label column on the pooled [CLS] of
  ``[CLS] image [SEP] report [SEP]`` (the paper feeds image and report, as its classifier
  code does; `report_column: null` gives image only), BCE; scored by micro AUROC / F1.
- `medvill_vqa`: answer classification on the pooled [CLS] of ``[CLS] image [SEP] question
  [SEP]``. No VQA-RAD here: questions are templated from the corpus's label columns on the
  worker (`vqa_questions`), deterministic per image (seeded by its report text, a column the
  objective reads anyway), one closed (yes/no) and one open (which finding / "none") per
  image; closed and open accuracy are reported apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydiology.config_base import check
from raydiology.data.phantom import LABEL_COLUMNS
from raydiology.models.medvill import MASK_SCHEMES, MedViLL
from raydiology.objectives.medvill import export_medvill, require_medvill
from raydiology.registry import OBJECTIVES

NO_FINDING = "label_no_finding"  # a label column, but not a finding to ask about
CLOSED_TEMPLATES = ("Is there {}?", "Does the image show {}?", "Is {} present?")
OPEN_TEMPLATES = ("Which finding is present?", "What abnormality is seen?",
                  "What is the main finding?")  # fmt: skip


def _check_common(cfg: Any, k: str) -> None:
    check(bool(cfg.label_columns), f"{k}label_columns", cfg.label_columns, "at least one column")
    check(cfg.attention in MASK_SCHEMES, f"{k}attention", cfg.attention,
          "one of " + ", ".join(MASK_SCHEMES))  # fmt: skip


class _MedViLLHead(nn.Module):
    """A MedViLL plus one linear head on its pooled [CLS]; exports both (`export_extra`)."""

    NAME = ""
    TASK = ""

    def __init__(self, cfg: Any, model: MedViLL, outputs: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        hidden = int(model.bert.config.hidden_size)
        self.head = nn.Linear(hidden, outputs)

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def labels(self, batch: dict[str, Any]) -> Tensor:
        """[B, K] float labels from the batch's ``label:<col>`` entries (KeyError if absent)."""
        columns = [batch[f"label:{c}"] for c in self.cfg.label_columns]
        return torch.stack([torch.as_tensor(c).float() for c in columns], dim=1)

    def logits(self, feats: Tensor, grid_pos: Tensor, texts: list[list[int]]) -> Tensor:
        """Visual features [B, n, C] at grid positions [B, n] + token ids -> head logits."""
        limit = self.model.cfg.max_text_tokens
        hidden, segments, _ = self.model.joint(
            feats, grid_pos, [t[:limit] for t in texts], scheme=self.cfg.attention
        )
        return self.head(self.model.pooled(hidden, segments))

    def export_extra(self, folder: Path, *, write: bool, gather: bool) -> None:
        """Model + head beside the encoder export; `load_medvill_task` reads it back."""
        export_medvill(self, folder, write=write, gather=gather, name=self.NAME,
                       extra={"task": self.TASK, "outputs": self.output_names()})  # fmt: skip

    def output_names(self) -> list[str]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- diagnosis


@dataclass(kw_only=True)
class DiagnosisConfig:
    """The `objective` section for ``name: medvill_diagnosis``."""

    # One sigmoid head per column (the phantom corpus has 6; CheXpert-labelled MIMIC, 14).
    label_columns: tuple[str, ...] = LABEL_COLUMNS
    report_column: str | None = "report"  # the paper's input: image + report; null = image
    attention: str = "bi"
    threshold: float = 0.5  # for F1: a label is predicted when its probability exceeds this

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        _check_common(self, k)
        check(0 < self.threshold < 1, f"{k}threshold", self.threshold, "0 < t < 1")

    def corpus_columns(self) -> dict[str, str]:
        columns = {f"label:{c}": c for c in self.label_columns}
        if self.report_column is not None:
            columns["report"] = self.report_column
        return columns


class MedViLLDiagnosis(_MedViLLHead):
    """batch {"image", "report", "label:<col>": [B]} -> {"loss" (BCE), "acc"}."""

    NAME = "medvill_diagnosis"
    TASK = "diagnosis"

    def __init__(self, cfg: DiagnosisConfig, model: MedViLL) -> None:
        super().__init__(cfg, model, len(cfg.label_columns))

    def output_names(self) -> list[str]:
        return list(self.cfg.label_columns)

    def texts(self, reports: Sequence[str] | None, n: int) -> list[list[int]]:
        if self.cfg.report_column is None:
            return [[] for _ in range(n)]
        if reports is None:
            raise KeyError("medvill_diagnosis needs batch['report'] (report_column)")
        return [self.model.tokenizer.encode(str(r)) for r in reports]

    def predict_logits(self, images: Tensor, reports: Sequence[str] | None) -> Tensor:
        """images [B, C, R, R] (+ B reports) -> logits [B, K]."""
        feats, pos = self.model.visual_tokens(images)
        return self.logits(feats, pos, self.texts(reports, len(images)))

    def forward(
        self, batch: dict[str, Any], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        targets = self.labels(batch)
        logits = self.predict_logits(batch["image"], batch.get("report"))
        targets = targets.to(logits.device, logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        with torch.no_grad():
            acc = ((logits.sigmoid() > self.cfg.threshold) == (targets > 0.5)).float().mean()
        return {"loss": loss, "acc": acc}


@OBJECTIVES.register("medvill_diagnosis", DiagnosisConfig)
def build_medvill_diagnosis(cfg: DiagnosisConfig, *, model: nn.Module) -> MedViLLDiagnosis:
    return MedViLLDiagnosis(cfg, require_medvill(model, "medvill_diagnosis"))


# ----------------------------------------------------------------------------- VQA


@dataclass(frozen=True)
class VQAItem:
    question: str
    answer: str
    kind: Literal["closed", "open"]


def finding_names(label_columns: Sequence[str]) -> list[str]:
    """Label columns asked about, as words: label_pleural_effusion -> "pleural effusion"."""
    return [c.removeprefix("label_").replace("_", " ") for c in label_columns if c != NO_FINDING]


def answer_vocabulary(label_columns: Sequence[str]) -> list[str]:
    """The answer classes: yes/no, each finding, and "none" (open question, nothing seen)."""
    return ["no", "yes", *finding_names(label_columns), "none"]


def vqa_questions(key: str, labels: Sequence[float], label_columns: Sequence[str]) -> list[VQAItem]:
    """One closed and one open question about an image, a function of its key (its report,
    or any per-image text) and labels.

    Closed: "Is there <finding>?" about a finding the image has (half the time, when it has
    any) or any finding, so yes and no both occur. Open: "Which finding is present?" ->
    the first present finding in column order, or "none". Templates vary with the key;
    sha256 (not Python's salted hash) keeps every worker and every run in agreement.
    """
    names = finding_names(label_columns)
    present = [bool(v > 0.5) for c, v in zip(label_columns, labels, strict=True) if c != NO_FINDING]
    if not names:
        raise ValueError(f"no finding among the label columns {list(label_columns)}")
    draw = hashlib.sha256(key.encode()).digest()
    positives = [i for i, p in enumerate(present) if p]
    if positives and draw[0] % 2 == 0:
        asked = positives[draw[1] % len(positives)]
    else:
        asked = draw[1] % len(names)
    closed = VQAItem(CLOSED_TEMPLATES[draw[2] % len(CLOSED_TEMPLATES)].format(names[asked]),
                     "yes" if present[asked] else "no", "closed")  # fmt: skip
    opened = VQAItem(OPEN_TEMPLATES[draw[3] % len(OPEN_TEMPLATES)],
                     names[positives[0]] if positives else "none", "open")  # fmt: skip
    return [closed, opened]


@dataclass(kw_only=True)
class VQAConfig:
    """The `objective` section for ``name: medvill_vqa``."""

    # the findings questions are about (a `label_no_finding` column is not asked about)
    label_columns: tuple[str, ...] = LABEL_COLUMNS
    # The per-image text the questions are seeded from. The report (unique per study) by
    # default: `image_id` works in training, but is also a pixel column, which some readers
    # (bench/step.py's) would then select twice.
    seed_column: str = "report"
    attention: str = "bi"

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        _check_common(self, k)
        check(bool(finding_names(self.label_columns)), f"{k}label_columns", self.label_columns,
              f"at least one finding besides {NO_FINDING}")  # fmt: skip

    def corpus_columns(self) -> dict[str, str]:
        return {"vqa_seed": self.seed_column, **{f"label:{c}": c for c in self.label_columns}}


class MedViLLVQA(_MedViLLHead):
    """batch {"image", "vqa_seed", "label:<col>"} -> {"loss" (CE), "closed_acc", "open_acc"}.

    Each image is encoded by the CNN once and paired with each of its questions.
    """

    NAME = "medvill_vqa"
    TASK = "vqa"

    def __init__(self, cfg: VQAConfig, model: MedViLL) -> None:
        answers = answer_vocabulary(cfg.label_columns)
        super().__init__(cfg, model, len(answers))
        self.answers = answers

    def output_names(self) -> list[str]:
        return list(self.answers)

    def items(self, keys: Sequence[str], labels: Tensor) -> list[list[VQAItem]]:
        rows = labels.cpu().tolist()
        return [vqa_questions(str(i), r, self.cfg.label_columns)
                for i, r in zip(keys, rows, strict=True)]  # fmt: skip

    def answer_logits(self, images: Tensor, questions: list[list[str]]) -> Tensor:
        """images [B, C, R, R] + questions per image -> logits [sum of counts, A]."""
        feats, pos = self.model.visual_tokens(images)
        counts = torch.tensor([len(q) for q in questions], device=feats.device)
        # " ?": a whitespace-split vocabulary learnt from reports (ours) would glue "?" to
        # the finding's word and make it unknown
        texts = [self.model.tokenizer.encode(q.replace("?", " ?")) for qs in questions for q in qs]
        return self.logits(
            feats.repeat_interleave(counts, dim=0), pos.repeat_interleave(counts, dim=0), texts
        )

    def forward(
        self, batch: dict[str, Any], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        labels = self.labels(batch)
        if "vqa_seed" not in batch:
            raise KeyError("medvill_vqa needs batch['vqa_seed'] (seed_column)")
        items = self.items(list(batch["vqa_seed"]), labels)
        logits = self.answer_logits(batch["image"], [[it.question for it in r] for r in items])
        flat = [it for r in items for it in r]
        index = {a: i for i, a in enumerate(self.answers)}
        target = torch.tensor([index[it.answer] for it in flat], device=logits.device)
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            right = logits.argmax(dim=1) == target
            closed = torch.tensor([it.kind == "closed" for it in flat], device=logits.device)
            out = {"loss": loss}
            out["closed_acc"] = right[closed].float().mean() if closed.any() else loss * 0
            out["open_acc"] = right[~closed].float().mean() if (~closed).any() else loss * 0
        return {k: v if k == "loss" else v.detach() for k, v in out.items()}


@OBJECTIVES.register("medvill_vqa", VQAConfig)
def build_medvill_vqa(cfg: VQAConfig, *, model: nn.Module) -> MedViLLVQA:
    return MedViLLVQA(cfg, require_medvill(model, "medvill_vqa"))


# ----------------------------------------------------------------------------- loading


def load_medvill_task(
    run_or_export_dir: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """(the exported objective with its head, in eval mode; the encoder export's JSON).

    Rebuilt from medvill.json's objective section through the registry; safetensors only.
    """
    from safetensors.torch import load_file

    from raydiology.config_base import from_dict
    from raydiology.models.medvill import MEDVILL_WEIGHTS, find_medvill_export, load_medvill_export

    model, spec, extra = load_medvill_export(run_or_export_dir)
    section = dict(extra["objective"])
    entry = OBJECTIVES.get(section.pop("name"))
    objective = entry.builder(from_dict(entry.config_cls, section, "objective"), model=model)
    state = load_file(str(find_medvill_export(run_or_export_dir) / MEDVILL_WEIGHTS))
    objective.load_state_dict(state, strict=True)
    return objective.to(device).eval(), spec
