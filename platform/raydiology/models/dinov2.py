"""A DINOv2-style ViT (XR-0's backbone) and the DINO projection head.

What DINOv2 needs beyond a stock ViT: learnable absolute positions that are interpolated to
whatever crop comes in (518-px global and 196-px local crops go through the same weights),
layer-scale on every residual branch, and a learnable mask token that iBOT swaps in for the
patch embeddings it hides from the student. Parameter names follow DINOv2's own
(`patch_embed.proj`, `blocks.i.ls1.gamma`, `mask_token` [1, D], ...), so its released
weights load from a local file without renaming.

The head sits in the model (not the objective) so that a flavor sizes it too: the tiny
flavor's head has 256 prototypes, ViT-B/14's has DINOv2's 65,536. The objective makes the
EMA teacher from a copy of ``encoder`` + ``head``.

Shapes: B batch, C channels, H×W image, p patch size, (gh, gw) patch grid, N = gh·gw
patches, D embedding dim, K prototypes.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from raydiology.config_base import check, with_overrides
from raydiology.models.vit import LayerIds, LinearPatchEmbed, check_input_geometry, is_meta
from raydiology.registry import MODELS


@dataclass(frozen=True, kw_only=True)
class DINOv2Args:
    """The numbers that size one backbone + head (one row of the flavors table)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    layerscale_init: float = 1.0e-5  # DINOv2's layer-scale start value
    head_layers: int = 3
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_prototypes: int = 65536


DINOV2_FLAVORS: dict[str, DINOv2Args] = {
    # CPU smoke tests: a few steps at 128 px in well under a second each. The head keeps
    # DINOv2's 256-d bottleneck (dinov2/configs/ssl_default_config.yaml): cosines of random
    # 32-d features spread 3x wider, so a random teacher's targets start sharp and the same
    # for every image, and centring spends the whole smoke run flattening them (the DINO
    # term climbs to ln K); at 256-d they start near-uniform, as in DINOv2's first steps.
    "tiny": DINOv2Args(
        patch_size=16, embed_dim=64, depth=2, num_heads=4,
        head_hidden_dim=128, head_bottleneck_dim=256, head_prototypes=256,
    ),
    # ViT-S/14 and ViT-L/14 for ablations; XR-0 is ViT-B/14.
    "s14": DINOv2Args(patch_size=14, embed_dim=384, depth=12, num_heads=6),
    "b14": DINOv2Args(patch_size=14, embed_dim=768, depth=12, num_heads=12),
    "l14": DINOv2Args(patch_size=14, embed_dim=1024, depth=24, num_heads=16),
}  # fmt: skip


@dataclass(kw_only=True)
class DINOv2Config:
    """The `model` section for ``name: dinov2_vit``: a flavor plus optional overrides."""

    flavor: str = "b14"
    drop_path_rate: float = 0.0  # stochastic depth, the same rate in every block (DINOv2 "uniform")
    # Freeze the head's weight-norm gain at 1. DINOv2 trains it (dinov2/layers/dino_head.py:
    # weight_norm, weight_g filled with 1, left trainable); DINO v1 froze it by default
    # (facebookresearch/dino vision_transformer.py DINOHead, main_dino.py --norm_last_layer).
    norm_last_layer: bool = False
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    layerscale_init: float | None = None
    head_layers: int | None = None
    head_hidden_dim: int | None = None
    head_bottleneck_dim: int | None = None
    head_prototypes: int | None = None

    def resolved(self) -> dict[str, Any]:
        """The effective sizes: the flavor's row with the overrides applied."""
        return with_overrides(DINOV2_FLAVORS[self.flavor], self)

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(
            self.flavor in DINOV2_FLAVORS,
            f"{k}flavor",
            self.flavor,
            "one of the flavors " + ", ".join(DINOV2_FLAVORS),
        )
        check(0 <= self.drop_path_rate < 1, f"{k}drop_path_rate", self.drop_path_rate, "[0, 1)")
        for f in dataclasses.fields(DINOv2Args):
            value = getattr(self, f.name)
            check(value is None or value > 0, f"{k}{f.name}", value, "a positive number")
        r = self.resolved()
        check(
            r["embed_dim"] % r["num_heads"] == 0,
            f"{k}num_heads",
            r["num_heads"],
            f"a divisor of embed_dim ({r['embed_dim']})",
        )


class DINOv2ViT(LayerIds, nn.Module):
    """A ViT that takes any input size (positions interpolated) and optional iBOT masks.

    The position table is learnt at the build size (`image_size`, i.e. data.resolution) and
    resampled bicubically for other grids. Weights initialise as DINOv2 does: truncated
    normal (std 0.02) for linear maps and positions, a near-zero CLS, a zero mask token.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        layerscale_init: float = 1.0e-5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch {patch_size}")
        self._image_size = image_size
        self._patch_size = patch_size
        self._in_chans = in_chans
        grid = image_size // patch_size
        self._grid_size = (grid, grid)

        self.patch_embed = LinearPatchEmbed(
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # DINOv2's shape
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                init_values=layerscale_init,
                drop_path=drop_path_rate,
                norm_layer=norm,  # type: ignore[arg-type]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    # -- geometry, readable without running the model -------------------------------------
    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self._grid_size

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def embed_dim(self) -> int:
        return self.cls_token.shape[-1]

    @property
    def in_chans(self) -> int:
        return self._in_chans

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # CLS

    def init_weights(self) -> None:
        """DINOv2's init; a no-op on the meta device (call again after `to_empty`)."""
        if is_meta(self):
            return
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def positions(self, grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """The position table for a (gh, gw) grid: [1, 1+gh*gw, D], resampled if need be."""
        pos = self.pos_embed
        if grid != self._grid_size:
            pos = resample_abs_pos_embed(
                pos, new_size=list(grid), old_size=list(self._grid_size), num_prefix_tokens=1
            )
        return pos.to(dtype)

    def forward(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        """images [B, C, H, W] (H, W multiples of p), masks [B, N] bool (True = hidden from
        the model, replaced by the mask token) or None -> tokens [B, 1+N, D], CLS first."""
        h, w = images.shape[-2:]
        p = self._patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        x = self.patch_embed(images)  # [B, N, D]
        if masks is not None:
            x = torch.where(masks[..., None], self.mask_token.to(x.dtype)[None], x)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions((h // p, w // p), x.dtype)  # [B, 1+N, D]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class WeightNormLinear(nn.Module):
    """A bias-free linear map with weight normalisation, as DINO's last layer:
    weight = weight_g · weight_v / ‖weight_v‖ row by row (torch's `weight_norm` with dim 0,
    DINOv2's parameter names). The gain starts at 1; `norm_last_layer` freezes it there so
    only directions are learnt (DINO v1's default), else it trains (DINOv2's).

    x [*, in] -> [*, out]; at gain 1 and unit-norm inputs the outputs are cosine similarities.
    """

    def __init__(self, in_features: int, out_features: int, *, norm_last_layer: bool) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not norm_last_layer)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        if not self.weight_v.is_meta:
            trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=-1))


class DINOHead(nn.Module):
    """DINO's projection head: MLP (GELU) -> bottleneck -> L2-normalise -> prototypes.

    x [*, D] -> logits [*, K]: cosine similarities scaled by each prototype's gain (1 at
    init), before the temperature.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        prototypes: int,
        layers: int,
        norm_last_layer: bool = False,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            mlp.append(nn.Linear(a, b))
            if i < layers - 1:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.last_layer = WeightNormLinear(
            bottleneck_dim, prototypes, norm_last_layer=norm_last_layer
        )
        if not is_meta(self):
            for m in self.mlp.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    @property
    def prototypes(self) -> int:
        return self.last_layer.weight_v.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)  # eps safe in fp16/bf16
        return self.last_layer(x)


class DINOv2Model(nn.Module):
    """`encoder` (a DINOv2ViT, what gets exported) and `head` (a DINOHead, shared by the
    DINO loss on CLS and the iBOT loss on masked patch tokens, as DINOv2's default)."""

    encoder: DINOv2ViT
    head: DINOHead

    def __init__(self, encoder: DINOv2ViT, head: DINOHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def forward(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        """images [B, C, H, W], masks [B, N] or None -> tokens [B, 1+N, D]."""
        return self.encoder(images, masks)


@MODELS.register("dinov2_vit", DINOv2Config)
def build_dinov2_vit(cfg: DINOv2Config, *, image_size: int, in_chans: int) -> DINOv2Model:
    """Build from the model section; image size and channels come from the data section."""
    cfg.validate("model")
    a = DINOv2Args(**cfg.resolved())
    check_input_geometry(image_size, in_chans, a.patch_size)
    encoder = DINOv2ViT(
        image_size=image_size,
        patch_size=a.patch_size,
        in_chans=in_chans,
        embed_dim=a.embed_dim,
        depth=a.depth,
        num_heads=a.num_heads,
        mlp_ratio=a.mlp_ratio,
        layerscale_init=a.layerscale_init,
        drop_path_rate=cfg.drop_path_rate,
    )
    head = DINOHead(
        in_dim=a.embed_dim,
        hidden_dim=a.head_hidden_dim,
        bottleneck_dim=a.head_bottleneck_dim,
        prototypes=a.head_prototypes,
        layers=a.head_layers,
        norm_last_layer=cfg.norm_last_layer,
    )
    return DINOv2Model(encoder, head)
