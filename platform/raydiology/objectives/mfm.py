"""Masked feature modelling (EVA-02 / EVA-X): hide a fraction of the student's patch tokens
behind a learnable mask token and predict the frozen teacher's features at those positions.

The student sees every position (masked ones as the mask token, unlike MAE which drops them),
so the cost does not shrink with the mask ratio, and EVA-X masks only 30%. The loss is
1 − cosine similarity between the projected student features and the teacher's, averaged over
the masked tokens only. Masks are random (default) or BEiT-style block-wise, with the same
number of masked patches in every sample either way.

Shapes: B batch, N patches (gh·gw), T teacher dim.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn

from raydiology.config_base import ConfigError, check
from raydiology.models.eva import EvaX
from raydiology.objectives.masking import MaskGenerator, MaskingConfig
from raydiology.registry import OBJECTIVES

# int(N * (1 - ratio)) must not lose a patch to float error (as in objectives/masking.py).
_EPS = 1e-6


@dataclass(kw_only=True)
class MFMObjectiveConfig:
    """The `objective` section for ``name: mfm``."""

    mask_ratio: float = 0.3  # fraction of patch tokens hidden (EVA-X: 0.3)
    masking: Literal["random", "block"] = "random"
    # block masking (BEiT/EVA-02): rectangles of at least this many patches (capped by the
    # number to mask) with aspect ratios in [block_aspect, 1 / block_aspect]
    min_block_patches: int = 16
    block_aspect: float = 0.3

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(
            0.0 < self.mask_ratio < 1.0, f"{k}mask_ratio", self.mask_ratio, "a fraction in (0, 1)"
        )
        check(
            self.min_block_patches >= 1,
            f"{k}min_block_patches",
            self.min_block_patches,
            "at least 1",
        )
        check(
            0.0 < self.block_aspect <= 1.0,
            f"{k}block_aspect",
            self.block_aspect,
            "a ratio in (0, 1]",
        )


def num_masked(num_patches: int, ratio: float) -> int:
    """How many of N patches are hidden: N - floor(N·(1 - ratio)), as MAE's random masking."""
    return num_patches - int(num_patches * (1.0 - ratio) + _EPS)


def block_mask(
    grid: tuple[int, int], count: int, rng: random.Random, *, min_block: int, aspect: float
) -> Tensor:
    """One BEiT-style block-wise mask: bool [gh, gw] with exactly `count` True cells.

    Rectangles of random area (min_block .. what is still to mask) and aspect ratio are added
    while they bring new cells without overshooting; when ten tries in a row add nothing, the
    rest are scattered at random (small grids, awkward leftovers).
    """
    gh, gw = grid
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    done, failures = 0, 0
    min_block = max(1, min(min_block, count))
    log_lo, log_hi = math.log(aspect), math.log(1.0 / aspect)
    while done < count and failures < 10:
        left_to_mask = count - done
        area = rng.uniform(min_block, max(min_block, left_to_mask))
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        h = min(gh, max(1, round(math.sqrt(area * ratio))))
        w = min(gw, max(1, round(math.sqrt(area / ratio))))
        top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
        new = int((~mask[top : top + h, left : left + w]).sum())
        if 0 < new <= left_to_mask:
            mask[top : top + h, left : left + w] = True
            done += new
            failures = 0
        else:
            failures += 1
    if done < count:
        free = (~mask).flatten().nonzero().flatten().tolist()
        for i in rng.sample(free, count - done):
            mask.view(-1)[i] = True
    return mask


class MFMObjective(nn.Module):
    """batch {"image": [B, C, H, W]} -> {"loss": 1 - cos on masked tokens, logs...}."""

    model: EvaX

    def __init__(self, cfg: MFMObjectiveConfig, model: EvaX) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.grid_size = model.grid_size
        n = self.grid_size[0] * self.grid_size[1]
        self.num_masked = num_masked(n, cfg.mask_ratio)
        if not 0 < self.num_masked < n:
            raise ConfigError(
                "objective.mask_ratio",
                cfg.mask_ratio,
                f"a ratio that masks some but not all of the {n} patches",
            )
        self._random = MaskGenerator(
            MaskingConfig(strategy="random", ratio=cfg.mask_ratio), self.grid_size
        )

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def draw_mask(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """-> bool [B, N] (True = hidden), `num_masked` per sample, reproducible under `generator`."""
        if self.cfg.masking == "random":
            masking = self._random(batch_size, generator=generator, device=device)
            return masking.mask.bool()
        # Block masks are drawn on the CPU from one seed taken from the generator, so the
        # Python loop costs no device synchronisation per rectangle.
        gen_device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).item())
        rng = random.Random(seed)
        masks = [
            block_mask(
                self.grid_size,
                self.num_masked,
                rng,
                min_block=self.cfg.min_block_patches,
                aspect=self.cfg.block_aspect,
            ).flatten()
            for _ in range(batch_size)
        ]
        return torch.stack(masks).to(device)

    def forward(
        self, batch: dict[str, Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        images = batch["image"]  # [B, C, H, W], already normalised
        mask = self.draw_mask(images.shape[0], generator=generator, device=images.device)
        loss, pred, target = self.model(images, mask)
        with torch.no_grad():
            cos = torch.cosine_similarity(pred.float(), target.float(), dim=-1)  # [B, N]
            visible_cos = cos[~mask].mean() if (~mask).any() else cos.new_zeros(())
        return {
            "loss": loss,
            "mask_ratio": mask.float().mean(),
            "masked_cosine": (1.0 - loss).detach(),
            "visible_cosine": visible_cos,  # not trained on; a sanity check on the head
        }


@OBJECTIVES.register("mfm", MFMObjectiveConfig)
def build_mfm(cfg: MFMObjectiveConfig, *, model: nn.Module) -> MFMObjective:
    missing = [
        a
        for a in ("forward_student", "forward_targets", "forward_loss", "teacher", "grid_size")
        if not hasattr(model, a)
    ]
    if missing:
        raise TypeError(
            f"objective 'mfm' needs an EVA-X-like model (student, frozen teacher, head); "
            f"{type(model).__name__} lacks {', '.join(missing)}"
        )
    teacher = cast(EvaX, model).teacher
    if getattr(teacher, "placeholder", False):
        raise ConfigError(
            "model.teacher.path",
            teacher.loaded_from,
            "an existing teacher (export folder or checkpoint) to train against",
        )
    return MFMObjective(cfg, cast(EvaX, model))
