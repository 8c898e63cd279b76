"""CLIP: symmetric contrastive loss between images and their reports (MambaXray-VL stage 2).

    logits = exp(s) * norm(image features) @ norm(report features)^T      [N, N]
    loss   = (CE(logits, arange N) + CE(logits^T, arange N)) / 2

with s the model's learnable log scale (init ln(1/0.07), clamped at ln 100 as in CLIP). Under
torch.distributed the features of every rank are gathered first, so the negatives are the
global batch (N = world x B); only the local slice carries gradient (OpenCLIP's default), and
each rank's loss is the same global loss.

The run's export holds the image encoder (the objective's `encoder`) and, from
`export_extra`, the rest of the CLIP, so `raydiology.models.clip.load_clip(run)` rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydiology.config_base import check, to_dict
from raydiology.models.clip import LOGIT_SCALE_MAX, ImageReportClip, save_clip
from raydiology.registry import OBJECTIVES
from raydiology.train import collectives


@dataclass(kw_only=True)
class ClipObjectiveConfig:
    """The `objective` section for ``name: clip``."""

    report_column: str = "report"
    gather: bool = True  # contrast against the global batch when running on several ranks

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(bool(self.report_column), f"{k}report_column", self.report_column, "a column name")

    def corpus_columns(self) -> dict[str, str]:
        return {"report": self.report_column}


def gather_with_local_grad(x: Tensor) -> Tensor:
    """[B, P] on each rank -> [world x B, P] in rank order; gradient flows to the local rows."""
    if not collectives.active():
        return x
    parts = collectives.all_gather(x)
    parts[collectives.rank()] = x
    return torch.cat(parts)


def clip_loss(image: Tensor, text: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
    """image, text [N, P] (row i of each is a pair), log_scale [] or [1] -> (symmetric CE,
    logits [N, N])."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = log_scale.clamp(max=LOGIT_SCALE_MAX).exp() * image @ text.t()
    target = torch.arange(len(image), device=image.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    return loss, logits


class ClipObjective(nn.Module):
    """batch {"image": [B, C, R, R], "report": list[str]} -> {"loss", "logit_scale", "acc"}."""

    def __init__(self, cfg: ClipObjectiveConfig, model: ImageReportClip) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def forward(
        self, batch: dict[str, Any], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        if "report" not in batch:
            raise KeyError("clip needs batch['report'] (the corpus's report text)")
        image, text = self.model(batch["image"], list(batch["report"]))
        if self.cfg.gather:
            image, text = gather_with_local_grad(image), gather_with_local_grad(text)
        loss, logits = clip_loss(image, text, self.model.logit_scale)
        with torch.no_grad():
            target = torch.arange(len(logits), device=logits.device)
            acc = (logits.argmax(dim=1) == target).float().mean()
            scale = self.model.logit_scale.detach().clamp(max=LOGIT_SCALE_MAX).exp().squeeze()
        return {"loss": loss, "logit_scale": scale, "i2t_acc": acc}

    def export_extra(self, folder: Path, *, write: bool, gather: bool) -> None:
        """Beside the exported image encoder: text tower, projections, logit scale, tokenizer.

        Every rank calls this; under ZeRO-3 they all gather the weights (`gather`), and only
        the writing rank saves them.
        """
        import deepspeed

        params = [p for n, p in self.model.named_parameters() if not n.startswith("encoder.")]
        with deepspeed.zero.GatheredParameters(params, enabled=gather):
            if write:
                counts = {"total": _numel(self.model), "text": _numel(self.model.text)}
                objective = {"name": "clip", **to_dict(self.cfg)}
                save_clip(self.model, folder, extra={"objective": objective, "parameters": counts})


def _numel(module: nn.Module) -> int:
    """Parameter count; `ds_numel` is a ZeRO-3 parameter's full size outside a gather."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


@OBJECTIVES.register("clip", ClipObjectiveConfig)
def build_clip(cfg: ClipObjectiveConfig, *, model: nn.Module) -> ClipObjective:
    if not isinstance(model, ImageReportClip):
        raise TypeError(
            f"objective 'clip' trains an image_report_clip model, not {type(model).__name__}"
        )
    return ClipObjective(cfg, model)
