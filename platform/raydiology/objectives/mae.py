"""The MAE objective: mask patches, reconstruct their pixels, score masked patches only.

Wraps any MaskedAutoencoder-like model (one with `forward_encoder`, `forward_decoder` and
`forward_loss`, e.g. `raydiology.models.hd_mae`), owns the masking, and turns a batch into
``{"loss": ..., logs}`` for the training loop. `encoder` is what gets exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from raydiology.models.hd_mae import MaskedAutoencoder
from raydiology.models.vit import patchify, unpatchify
from raydiology.objectives.masking import MaskGenerator, MaskingConfig, boxes_to_grid
from raydiology.registry import OBJECTIVES


@dataclass(kw_only=True)
class MAEObjectiveConfig:
    """The `objective` section for ``name: mae``."""

    norm_pix_loss: bool = False  # standardise each target patch (MAE option; off in HD-MAE)
    masking: MaskingConfig = field(default_factory=MaskingConfig)

    def validate(self, key: str) -> None:
        self.masking.validate(f"{key}.masking" if key else "masking")

    def corpus_columns(self) -> dict[str, str]:
        """Batch key -> corpus column that the data pipeline must deliver."""
        column = self.masking.region_column
        return {"region": column} if column and self.masking.strategy == "context_aware" else {}


class MAEObjective(nn.Module):
    """batch {"image": [B, C, H, W], optional "region"} -> {"loss": scalar, logs...}."""

    model: MaskedAutoencoder  # or any module with the same methods and geometry

    def __init__(self, cfg: MAEObjectiveConfig, model: MaskedAutoencoder) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.masking = MaskGenerator(cfg.masking, model.grid_size)

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def _region(self, batch: dict[str, Tensor]) -> Tensor | None:
        if self.cfg.masking.strategy != "context_aware":
            return None
        if self.cfg.masking.region_column is not None and "region" not in batch:
            raise KeyError(
                f"objective.masking.region_column is {self.cfg.masking.region_column!r} "
                "but the batch has no 'region' entry"
            )
        region = batch.get("region")
        if region is not None and region.is_floating_point() and region.shape[-1] == 4:
            # a row whose corpus region is null arrives as NaN: it gets the configured region
            missing = region.isnan().any(dim=-1, keepdim=True)
            region = torch.where(missing, region.new_tensor(self.cfg.masking.region), region)
            region = boxes_to_grid(region, *self.model.grid_size)  # boxes from the corpus
        return region

    def forward(
        self, batch: dict[str, Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        images = batch["image"]  # [B, C, H, W], already normalised
        masking = self.masking(
            images.shape[0], generator=generator, device=images.device, region=self._region(batch)
        )
        loss, _ = self.model(images, masking, norm_pix_loss=self.cfg.norm_pix_loss)
        return {
            "loss": loss,
            "visible_tokens": torch.tensor(float(masking.num_visible), device=images.device),
            "mask_ratio": masking.mask.detach().mean(),
        }

    @torch.no_grad()
    def reconstruct(
        self,
        images: Tensor,
        *,
        generator: torch.Generator | None = None,
        region: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """images [B, C, H, W] -> {"masked", "reconstruction", "prediction", "mask"}, each
        [B, C, H, W] ("mask" [B, 1, H, W], 1 = masked), in the images' dtype.

        "masked" zeroes hidden patches (grey, on normalised images); "reconstruction" is the
        prediction with the visible patches pasted back (the MAE demo). With norm_pix_loss the
        prediction is un-normalised with each patch's true mean and variance, as MAE does.
        """
        b, c = images.shape[:2]
        p, grid = self.model.patch_size, self.model.grid_size
        masking = self.masking(b, generator=generator, device=images.device, region=region)
        _, pred = self.model(images, masking, norm_pix_loss=self.cfg.norm_pix_loss)
        pred = pred.float()  # [B, N, p*p*C]
        if self.cfg.norm_pix_loss:
            target = patchify(images, p).float()
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        prediction = unpatchify(pred, p, grid, c)  # [B, C, H, W]
        mask = masking.mask[..., None].expand(-1, -1, p * p)  # [B, N, p*p]
        mask = unpatchify(mask, p, grid, 1)  # [B, 1, H, W]
        x = images.float()
        out = {
            "masked": x * (1.0 - mask),
            "reconstruction": x * (1.0 - mask) + prediction * mask,
            "prediction": prediction,
            "mask": mask,
        }
        return {k: v.to(images.dtype) for k, v in out.items()}


@OBJECTIVES.register("mae", MAEObjectiveConfig)
def build_mae(cfg: MAEObjectiveConfig, *, model: nn.Module) -> MAEObjective:
    missing = [
        a
        for a in ("forward_encoder", "forward_decoder", "forward_loss", "grid_size", "patch_size")
        if not hasattr(model, a)
    ]
    if missing:
        raise TypeError(
            f"objective 'mae' needs a MaskedAutoencoder-like model; "
            f"{type(model).__name__} lacks {', '.join(missing)}"
        )
    return MAEObjective(cfg, cast(MaskedAutoencoder, model))  # duck-typed above
