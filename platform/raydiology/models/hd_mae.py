"""HD X-ray MAE ("Pre-training on High Definition X-ray Images"): a masked autoencoder for
1280x1280 radiographs with 64-px patches and a conv-stack patch embedding.

The paper's model is MAE with two changes that matter for high-definition X-rays: big
patches (64 px, so a 1280 image is still only 400 tokens) embedded by a small strided conv
stack rather than one linear map, and context-aware masking (see
`raydiology.objectives.masking`), which keeps only a handful of patches inside the chest.
Masking lives in the objective; this module is the network and its reconstruction loss.

Shapes: B batch, C channels, H×W image, p patch size, N patches, K visible patches,
D encoder dim, E decoder dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from raydiology.config_base import check, with_overrides
from raydiology.models.vit import (
    PatchEmbedKind,
    ViTEncoder,
    check_input_geometry,
    init_mae_weights,
    is_meta,
    patchify,
    sincos_pos_embed_2d,
    vit_blocks,
)
from raydiology.registry import MODELS


@dataclass(frozen=True, kw_only=True)
class HDMAEArgs:
    """The numbers that size one HD-MAE (one row of the flavors table)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0


HD_MAE_FLAVORS: dict[str, HDMAEArgs] = {
    # CPU smoke tests: trains a few steps at 128x128 in milliseconds.
    "tiny": HDMAEArgs(
        patch_size=16, embed_dim=64, depth=2, num_heads=4,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
    ),
    # ViT-B encoder with the paper's 64-px patches and decoder.
    "base": HDMAEArgs(
        patch_size=64, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
    # The paper: ViT-L/64 at 1x1280x1280, 8-block 512-d decoder.
    "large": HDMAEArgs(
        patch_size=64, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
}  # fmt: skip


@dataclass(kw_only=True)
class HDMAEConfig:
    """The `model` section for ``name: hd_mae``: a flavor plus optional overrides (None = flavor's)."""

    flavor: str = "large"
    patch_embed: PatchEmbedKind = "conv_stack"
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    mlp_ratio: float | None = None

    def resolved(self) -> dict[str, Any]:
        """The effective sizes: the flavor's row with the overrides applied."""
        return with_overrides(HD_MAE_FLAVORS[self.flavor], self)

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(
            self.flavor in HD_MAE_FLAVORS,
            f"{k}flavor",
            self.flavor,
            "one of the flavors " + ", ".join(HD_MAE_FLAVORS),
        )
        for f in dataclasses.fields(HDMAEArgs):
            value = getattr(self, f.name)
            check(value is None or value > 0, f"{k}{f.name}", value, "a positive number")
        r = self.resolved()
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            check(
                r[dim] % r[heads] == 0,
                f"{k}{heads}",
                r[heads],
                f"a divisor of {dim} ({r[dim]})",
            )
            check(r[dim] % 4 == 0, f"{k}{dim}", r[dim], "a multiple of 4 (2-D sin-cos positions)")
        if self.patch_embed == "conv_stack":
            check(
                r["patch_size"] % 4 == 0,
                f"{k}patch_size",
                r["patch_size"],
                "a multiple of 4 for the conv_stack patch embedding",
            )


def hd_mae_patch_size(cfg: HDMAEConfig) -> int:
    """The patch size a config builds, without building (for the experiment loader)."""
    return int(cfg.resolved()["patch_size"])


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder: latent [B, 1+K, D] + ids_restore [B, N] -> pixels [B, N, p*p*C].

    Projects the visible tokens to E dims, fills the masked slots with one learned mask token,
    unshuffles back to grid order, adds fixed positions and predicts every patch's pixels.
    """

    decoder_pos_embed: Tensor  # [1, 1+N, E]

    def __init__(
        self,
        *,
        grid_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        encoder_dim: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.decoder_embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(embed_dim, *grid_size)[None], persistent=True
        )  # [1, 1+N, E]
        self.blocks = vit_blocks(
            dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pred = nn.Linear(embed_dim, patch_size * patch_size * in_chans)
        self.init_weights()

    def init_weights(self) -> None:
        """MAE's init; a no-op on the meta device (call again after `to_empty`)."""
        if is_meta(self):
            return
        with torch.no_grad():
            embed_dim = self.mask_token.shape[-1]
            self.decoder_pos_embed.copy_(sincos_pos_embed_2d(embed_dim, *self.grid_size)[None])
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent [B, 1+K, D], ids_restore [B, N] -> pred [B, N, p*p*C]."""
        x = self.decoder_embed(latent)  # [B, 1+K, E]
        b, k1, e = x.shape
        n = ids_restore.shape[1]
        masked = self.mask_token.expand(b, n + 1 - k1, e)  # [B, N-K, E]
        x_ = torch.cat([x[:, 1:], masked], dim=1)  # [B, N, E] in shuffled order (kept first)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, e))  # [B, N, E] grid order
        x = torch.cat([x[:, :1], x_], dim=1)  # [B, 1+N, E]
        x = x + self.decoder_pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.pred(x)[:, 1:]  # drop CLS: [B, N, p*p*C]


class MaskedAutoencoder(nn.Module):
    """An MAE: `encoder` (a ViTEncoder, what gets exported) and `decoder` (an MAEDecoder).

    Masking is decided outside (by the objective) and comes in as a
    `raydiology.objectives.masking.Masking`: ids_keep [B, K], ids_restore [B, N], mask [B, N].
    """

    encoder: ViTEncoder
    decoder: MAEDecoder

    def __init__(self, encoder: ViTEncoder, decoder: MAEDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size

    @property
    def in_chans(self) -> int:
        return self.encoder.in_chans

    def init_weights(self) -> None:
        self.encoder.init_weights()
        self.decoder.init_weights()

    def forward_encoder(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        """images [B, C, H, W], ids_keep [B, K] -> latent [B, 1+K, D]; masked patches never enter."""
        return self.encoder(images, ids_keep)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent [B, 1+K, D], ids_restore [B, N] -> pred [B, N, p*p*C]."""
        return self.decoder(latent, ids_restore)

    def forward_loss(
        self, images: Tensor, pred: Tensor, mask: Tensor, *, norm_pix_loss: bool = False
    ) -> Tensor:
        """Mean squared error over masked patches only: images [B,C,H,W], pred [B,N,p*p*C],
        mask [B,N] (1 = masked) -> scalar.

        With `norm_pix_loss` each target patch is standardised by its own mean and variance
        (MAE's option; off in the HD-MAE paper). Computed in float32 whatever the model dtype.
        """
        target = patchify(images, self.patch_size).float()  # [B, N, p*p*C]
        if norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # [B, N]
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self, images: Tensor, masking: Any, *, norm_pix_loss: bool = False
    ) -> tuple[Tensor, Tensor]:
        """images [B, C, H, W], masking (ids_keep, ids_restore, mask) -> (loss, pred [B, N, p*p*C])."""
        latent = self.forward_encoder(images, masking.ids_keep)
        pred = self.forward_decoder(latent, masking.ids_restore)
        loss = self.forward_loss(images, pred, masking.mask, norm_pix_loss=norm_pix_loss)
        return loss, pred


@MODELS.register("hd_mae", HDMAEConfig)
def build_hd_mae(cfg: HDMAEConfig, *, image_size: int, in_chans: int) -> MaskedAutoencoder:
    """Build from the model section; image size and channels come from the data section."""
    cfg.validate("model")
    a = HDMAEArgs(**cfg.resolved())
    check_input_geometry(image_size, in_chans, a.patch_size)
    encoder = ViTEncoder(
        image_size=image_size,
        patch_size=a.patch_size,
        in_chans=in_chans,
        embed_dim=a.embed_dim,
        depth=a.depth,
        num_heads=a.num_heads,
        mlp_ratio=a.mlp_ratio,
        patch_embed=cfg.patch_embed,
    )
    decoder = MAEDecoder(
        grid_size=encoder.grid_size,
        patch_size=a.patch_size,
        in_chans=in_chans,
        encoder_dim=a.embed_dim,
        embed_dim=a.decoder_embed_dim,
        depth=a.decoder_depth,
        num_heads=a.decoder_num_heads,
        mlp_ratio=a.mlp_ratio,
    )
    return MaskedAutoencoder(encoder, decoder)
