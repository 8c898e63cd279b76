"""The autoregressive (ARG) objective of MambaXray-VL stage 1: predict each cluster of
patches from the clusters before it; MSE to the next cluster's per-patch-normalised pixels.

Nothing is masked or sampled: causality comes from the model (a unidirectional scan over
clusters in raster order and a causal-over-clusters decoder mask). `encoder` is what gets
exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from raydiology.models.vision_mamba import VisionMambaARG, cluster_order
from raydiology.models.vit import patchify, unpatchify
from raydiology.registry import OBJECTIVES


@dataclass(kw_only=True)
class ARGObjectiveConfig:
    """The `objective` section for ``name: arg``."""

    # Standardise each target patch: the official pretrain.sh and ARM's README pass
    # --norm_pix_loss.
    norm_pix_loss: bool = True

    def validate(self, key: str) -> None:
        return None

    def corpus_columns(self) -> dict[str, str]:
        return {}


class ARGObjective(nn.Module):
    """batch {"image": [B, C, H, W]} -> {"loss": scalar}."""

    model: VisionMambaARG

    def __init__(self, cfg: ARGObjectiveConfig, model: VisionMambaARG) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def forward(
        self, batch: dict[str, Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        loss, _ = self.model(batch["image"], norm_pix_loss=self.cfg.norm_pix_loss)
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(
        self, images: Tensor, *, generator: torch.Generator | None = None, **_: object
    ) -> dict[str, Tensor]:
        """images [B, C, H, W] -> {"masked", "reconstruction", "prediction", "mask"}, like
        the MAE objective's, for the run's picture.

        "masked" keeps only cluster 0 (what the first prediction sees); "reconstruction" is
        cluster 0 followed by each next-cluster prediction (every one made from the true
        clusters before it), un-normalised with each patch's true mean and variance.
        """
        m = self.model
        b, c = images.shape[:2]
        p, grid = m.encoder.patch_size, m.encoder.grid_size
        _, pred = m(images, norm_pix_loss=self.cfg.norm_pix_loss)  # [B, M, p·p·C]
        pred = pred.float()
        patches = patchify(images, p).float()  # [B, N, p·p·C] raster
        order = cluster_order(grid, m.encoder.cluster_size, images.device)
        first = m.encoder.tokens_per_cluster
        predicted = order[first:]  # raster ids of the predicted patches
        if self.cfg.norm_pix_loss:
            truth = patches[:, predicted]
            mean = truth.mean(dim=-1, keepdim=True)
            var = truth.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        full = patches.clone()
        full[:, predicted] = pred
        mask = torch.zeros(b, patches.shape[1], device=images.device)
        mask[:, predicted] = 1.0
        mask = unpatchify(mask[..., None].expand(-1, -1, p * p), p, grid, 1)  # [B, 1, H, W]
        x = images.float()
        out = {
            "masked": x * (1.0 - mask),
            "reconstruction": unpatchify(full, p, grid, c),
            "prediction": unpatchify(full, p, grid, c),
            "mask": mask,
        }
        return {k: v.to(images.dtype) for k, v in out.items()}


@OBJECTIVES.register("arg", ARGObjectiveConfig)
def build_arg(cfg: ARGObjectiveConfig, *, model: nn.Module) -> ARGObjective:
    needed = ("forward_encoder", "forward_decoder", "forward_loss", "num_clusters", "encoder")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing or not hasattr(getattr(model, "encoder", None), "cluster_size"):
        raise TypeError(
            f"objective 'arg' needs a VisionMambaARG-like model (vision_mamba_arg); "
            f"{type(model).__name__} lacks {', '.join(missing) or 'encoder.cluster_size'}"
        )
    return ARGObjective(cfg, cast(VisionMambaARG, model))
