"""Report SFT: supervised fine-tuning of a report generator on image-report pairs.

It trains any model with the report generators' interface — `encoder`, `tokenizer`,
`model(images, report_ids, view_mask) -> loss` and `model.generate(images, num_beams=...,
view_mask=...) -> reports`: `report_generator` (an LLM decoder) and `r2gen`.

The objective asks the data pipeline for the corpus's report text (`corpus_columns`),
tokenizes it on the training worker with the model's tokenizer (truncated to
`max_report_tokens`: 100 for MIMIC-CXR, 60 for IU X-ray in R2GenGPT/MambaXray-VL) and returns
the cross-entropy over report tokens. It also carries the run's generation settings (beam
search as the papers decode) and the checkpoint-selection metric mix, and writes what a
trained generator needs beyond the encoder into the run's export (`export_extra`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raydiology.config_base import check, to_dict
from raydiology.models.r2gen import R2Gen
from raydiology.models.report_generator import ReportGenerator
from raydiology.registry import OBJECTIVES

GENERATOR_FORMAT = "raydiology-report-generator/1"
GENERATOR_WEIGHTS = "generator.safetensors"
GENERATOR_SPEC = "generator.json"
TOKENIZER_DIR = "tokenizer"


@dataclass(kw_only=True)
class GenerationSettings:
    """Beam search as the papers decode (MIMIC defaults; IU X-ray: beam 5, 40-100 tokens)."""

    num_beams: int = 3
    repetition_penalty: float = 2.0
    length_penalty: float = 2.0
    min_new_tokens: int = 80
    max_new_tokens: int = 120
    no_repeat_ngram_size: int = 0
    batch_size: int = 16  # images per generate call

    def validate(self, key: str) -> None:
        check(self.num_beams >= 1, f"{key}.num_beams", self.num_beams, "at least 1")
        check(
            0 <= self.min_new_tokens <= self.max_new_tokens and self.max_new_tokens >= 1,
            f"{key}.min_new_tokens",
            self.min_new_tokens,
            f"0..max_new_tokens ({self.max_new_tokens})",
        )
        check(
            self.repetition_penalty > 0,
            f"{key}.repetition_penalty",
            self.repetition_penalty,
            "> 0 (1.0 = none)",
        )
        check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "at least 1")


@dataclass(kw_only=True)
class SelectionSettings:
    """Which checkpoint is best: a weighted sum of validation metrics (names as `raydiology
    eval` writes them). MambaXray-VL: 0.8 BLEU-4 + 0.2 CIDEr; R2GenGPT: 0.5 / 0.5."""

    weights: dict[str, float] = field(default_factory=lambda: {"BLEU_4": 0.8, "CIDEr": 0.2})
    split: str = "val"  # the corpus split validated on while training (`train.eval_every`)

    def validate(self, key: str) -> None:
        from raydiology.evaluation.nlg import METRICS

        check(
            bool(self.weights)
            and all(isinstance(v, (int, float)) for v in self.weights.values())
            and set(self.weights) <= set(METRICS),
            f"{key}.weights",
            self.weights,
            f"a mapping of metric name ({', '.join(METRICS)}) -> weight",
        )

    def score(self, metrics: dict[str, float]) -> float:
        return float(sum(w * metrics[name] for name, w in self.weights.items()))


@dataclass(kw_only=True)
class ReportSFTConfig:
    """The `objective` section for ``name: report_sft``."""

    report_column: str = "report"
    max_report_tokens: int = 100
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(self.max_report_tokens >= 1, f"{k}max_report_tokens", self.max_report_tokens, ">= 1")
        self.generation.validate(f"{k}generation")
        self.selection.validate(f"{k}selection")

    def corpus_columns(self) -> dict[str, str]:
        """Batch key -> corpus column: the report text arrives as `batch["report"]`."""
        return {"report": self.report_column}


class ReportSFT(nn.Module):
    """batch {"image": [B, C, R, R], "report": list[str]} -> {"loss", "report_tokens"}."""

    def __init__(self, cfg: ReportSFTConfig, model: ReportGenerator | R2Gen) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def tokenize(self, reports: list[str]) -> list[list[int]]:
        limit = self.cfg.max_report_tokens
        return [self.model.tokenizer.encode(text)[:limit] for text in reports]

    def forward(
        self, batch: dict[str, Any], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        if "report" not in batch:
            raise KeyError("report_sft needs batch['report'] (the corpus's report text)")
        images = batch["image"]
        ids = self.tokenize(list(batch["report"]))
        loss = self.model(images, ids, batch.get("view_mask"))  # mask: multi-view studies
        tokens = sum(len(r) + 1 for r in ids) / len(ids)  # + EOS
        return {"loss": loss, "report_tokens": torch.tensor(float(tokens), device=images.device)}

    @torch.no_grad()
    def generate(
        self, images: Tensor, *, synced_gpus: bool = False, view_mask: Tensor | None = None
    ) -> list[str]:
        """images [B, ...] (multi-view: [B, V, ...] with view_mask [B, V]) -> B reports with
        the run's beam-search settings.

        `synced_gpus`: every rank generates in step (needed under ZeRO-3)."""
        g = self.cfg.generation
        was_training = self.training
        self.eval()
        try:
            return self.model.generate(
                images,
                num_beams=g.num_beams,
                max_new_tokens=g.max_new_tokens,
                min_new_tokens=g.min_new_tokens,
                repetition_penalty=g.repetition_penalty,
                length_penalty=g.length_penalty,
                no_repeat_ngram_size=g.no_repeat_ngram_size,
                synced_gpus=synced_gpus,
                view_mask=view_mask,
            )
        finally:
            self.train(was_training)

    # Validation while training (train/validation.py): reports for the selection split.
    @property
    def validation_batch_size(self) -> int:
        return self.cfg.generation.batch_size

    def validation_rows(
        self, batch: dict[str, Any], *, synced_gpus: bool = False
    ) -> list[dict[str, str]]:
        """batch {"image": [B, C, R, R], "report": list[str]} -> B {"reference", "prediction"}.

        The reference is the report as the tokenizer sees it (cleaned when it cleans), as
        `evaluation/generate.py` writes it, so validation and test metrics compare.
        """
        predictions = self.generate(
            batch["image"], synced_gpus=synced_gpus, view_mask=batch.get("view_mask")
        )
        prepare = self.model.tokenizer.prepare
        return [
            {"reference": prepare(str(report or "")), "prediction": prediction}
            for report, prediction in zip(batch["report"], predictions, strict=True)
        ]

    def export_extra(self, folder: Path, *, write: bool, gather: bool) -> None:
        """Beside the exported encoder: the generator's other weights, its tokenizer and a spec.

        Saved: every parameter outside the encoder (which `encoder.safetensors` holds) except a
        frozen LLM read from `llm.path` — the projector, LoRA adapters, a fully trained or
        config-built LLM — so `generate_reports` rebuilds exactly the trained generator. Under
        ZeRO-3 all ranks gather the weights (`gather`); only the writing rank saves.
        """
        import deepspeed
        from safetensors.torch import save_file

        model = self.model
        names = [n for n, _ in model.named_parameters() if _exported(model, n)]
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters([params[n] for n in names], enabled=gather):
            if not write:
                return
            folder.mkdir(parents=True, exist_ok=True)
            tensors = {n: params[n].detach().to("cpu", torch.float32).contiguous() for n in names}
            save_file(
                tensors, str(folder / GENERATOR_WEIGHTS), metadata={"format": GENERATOR_FORMAT}
            )
        model.tokenizer.save(folder / TOKENIZER_DIR)
        counts = count_trainable(model)
        spec = {
            "format": GENERATOR_FORMAT,
            "weights": GENERATOR_WEIGHTS,
            "tokenizer": TOKENIZER_DIR,
            "objective": {"name": "report_sft", **to_dict(self.cfg)},
            "parameters": counts,
            "usage": "raydiology.evaluation.generate.generate_reports(run_or_export_dir, corpus)",
        }
        (folder / GENERATOR_SPEC).write_text(json.dumps(spec, indent=2))


def _exported(model: ReportGenerator | R2Gen, name: str) -> bool:
    if name.startswith("encoder."):
        return False  # in encoder.safetensors
    if name.startswith("llm.") and getattr(model, "llm_from_path", False):
        return "lora_" in name or model.llm_train == "full"
    return True


def count_trainable(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts (the CXPMRG-Bench table's last column)."""
    params = list(model.parameters())
    numel = [int(getattr(p, "ds_numel", p.numel())) for p in params]  # ZeRO-3: full sizes
    return {
        "total": sum(numel),
        "trainable": sum(n for n, p in zip(numel, params, strict=True) if p.requires_grad),
    }


@OBJECTIVES.register("report_sft", ReportSFTConfig)
def build_report_sft(cfg: ReportSFTConfig, *, model: nn.Module) -> ReportSFT:
    # both take (images, report ids, view_mask) -> loss and generate(images, beam settings)
    if not isinstance(model, ReportGenerator | R2Gen):
        raise TypeError(
            "objective 'report_sft' trains a report_generator or r2gen model, "
            f"not {type(model).__name__}"
        )
    return ReportSFT(cfg, model)
