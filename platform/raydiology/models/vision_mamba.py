"""Vision Mamba for MambaXray-VL (CXPMRG-Bench): the stage-1 autoregressive model and the
bidirectional encoder of stages 2-3.

Stage 1 (`vision_mamba_arg`, ARM's "Autoregressive Pretraining with Mamba in Vision" as the
official code builds it): a 192-px image is cut into 16-px patches (12x12) that are grouped
into clusters of 4x4 patches, 9 clusters in raster order, patches raster-ordered inside each.
A stack of unidirectional Mamba blocks reads clusters 0..K-2; a light decoder predicts the
pixels of clusters 1..K-1, each from the clusters before it. Because the scan is causal, the
encoder's features for cluster k depend on clusters <= k only; the decoder's cross-attention
mask keeps it that way.

Stages 2-3 (`vision_mamba`): the same blocks with a 4-direction mixer (rows and columns,
forward and reverse) and a CLS token in the middle of the sequence, at 224 px;
`init_from_arg` initialises it from a stage-1 export.

Shapes: B batch, C channels, p patch size, (gh, gw) patch grid, N = gh·gw patches, c cluster
side in patches (4), K clusters, T = c·c tokens per cluster, M = (K-1)·T encoder tokens,
D encoder dim, E decoder dim.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from raydiology.config_base import ConfigError, check, with_overrides
from raydiology.models.mamba import SCAN_IMPLS, Mamba, Mamba4D
from raydiology.models.vit import (
    LayerIds,
    LinearPatchEmbed,
    PatchGrid,
    check_input_geometry,
    init_mae_weights,
    is_meta,
    patchify,
    sincos_pos_embed_2d,
)
from raydiology.registry import MODELS

NUM_FEATURE_LAYERS = 4  # the decoder reads 4 encoder layers, one per decoder block


# ----------------------------------------------------------------------------- geometry


def cluster_order(grid: tuple[int, int], cluster: int, device: Any = None) -> Tensor:
    """[N] raster patch indices listed cluster by cluster (clusters and their patches both in
    raster order): `tokens[:, cluster_order(...)]` turns a raster sequence into clusters."""
    gh, gw = grid
    idx = torch.arange(gh * gw, device=device).view(gh // cluster, cluster, gw // cluster, cluster)
    return idx.permute(0, 2, 1, 3).reshape(-1)


def cluster_causal_mask(num_clusters: int, tokens_per_cluster: int, device: Any = None) -> Tensor:
    """Bool [M, M] attention mask, M = num_clusters·T, True = may attend: a query of the
    i-th predicted cluster (cluster i+1 of the image) sees encoder clusters 0..i."""
    cluster_of = torch.arange(num_clusters, device=device).repeat_interleave(tokens_per_cluster)
    return cluster_of[:, None] >= cluster_of[None, :]


def default_feature_layers(depth: int) -> tuple[int, ...]:
    """4 evenly spaced layers from the middle to the last (12 -> 6, 8, 10, 12; 24 -> 12..24)."""
    return tuple(round(depth / 2 + k * depth / 6) for k in range(NUM_FEATURE_LAYERS))


# ----------------------------------------------------------------------------- blocks


class SwiGLU(nn.Module):
    """w3(SiLU(w1 x) * w2 x), the hidden width floor(8d/3) in MambaXray-VL's blocks."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class MambaBlock(nn.Module):
    """x = x + mixer(LN(x)); x = x + SwiGLU(LN(x)). Keyword arguments go to the mixer.

    With `grad_checkpointing` on, a training forward keeps only the block's input and
    recomputes the rest in backward (one more forward, for the activation memory of a
    paper-sized batch).
    """

    mixer: Mamba
    grad_checkpointing = False

    def __init__(self, dim: int, mixer: Mamba) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, dim * 8 // 3)

    def forward(self, x: Tensor, **mixer_kwargs: Any) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return cast(Tensor, checkpoint(self._forward, x, use_reentrant=False, **mixer_kwargs))
        return self._forward(x, **mixer_kwargs)

    def _forward(self, x: Tensor, **mixer_kwargs: Any) -> Tensor:
        x = x + self.mixer(self.norm1(x), **mixer_kwargs)
        return x + self.mlp(self.norm2(x))


def _init_mamba_stack(module: nn.Module, depth: int) -> None:
    """The official init: Linear biases zero (dt_proj's excepted), out_proj scaled by
    1/sqrt(depth) (GPT-2's residual rule), unit LayerNorms, patch embedding like a Linear."""
    for name, m in module.named_modules():
        is_dt_proj = name.rsplit(".", 1)[-1].startswith("dt_proj")  # dt_proj, dt_proj_b, ...
        if isinstance(m, nn.Linear) and m.bias is not None and not is_dt_proj:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, Mamba):
            nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                m.out_proj.weight /= math.sqrt(depth)
        elif isinstance(m, LinearPatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            if m.proj.bias is not None:
                nn.init.zeros_(m.proj.bias)


def _mixers(embed_dim: int, depth: int, mixer_cls: type[Mamba], **mamba: Any) -> nn.ModuleList:
    return nn.ModuleList(MambaBlock(embed_dim, mixer_cls(embed_dim, **mamba)) for _ in range(depth))


def _set_grad_checkpointing(blocks: nn.ModuleList, enable: bool) -> None:
    for block in blocks:
        cast(MambaBlock, block).grad_checkpointing = enable


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True, kw_only=True)
class VisionMambaArgs:
    """The numbers that size one Vision Mamba encoder (a row of a flavors table)."""

    embed_dim: int
    depth: int
    patch_size: int = 16
    d_state: int = 16
    d_conv: int = 4
    expand: int = 1


@dataclass(frozen=True, kw_only=True)
class VisionMambaARGArgs(VisionMambaArgs):
    """Stage 1 adds the decoder and the cluster geometry."""

    feature_layers: tuple[int, ...] | None = None  # None: default_feature_layers(depth)
    decoder_dim: int = 512
    decoder_heads: int = 8
    cluster_size: int = 4  # patches per cluster side


VISION_MAMBA_ARG_FLAVORS: dict[str, VisionMambaARGArgs] = {
    # CPU smoke tests: 4 layers of 64 dims, a 64-dim decoder; 128 px = 2x2 clusters.
    "tiny": VisionMambaARGArgs(
        embed_dim=64, depth=4, feature_layers=(1, 2, 3, 4), decoder_dim=64, decoder_heads=4
    ),
    # The papers' Base and Large: ARM models_pretrain.py arm_base_pz16 / arm_large_pz16
    # (dec_embed_dim 512, heads 512 // 64 = 8; `self.skip` gives the feature layers).
    "base": VisionMambaARGArgs(embed_dim=768, depth=12, feature_layers=(6, 8, 10, 12)),
    "large": VisionMambaARGArgs(embed_dim=1024, depth=24, feature_layers=(12, 16, 20, 24)),
}

VISION_MAMBA_FLAVORS: dict[str, VisionMambaArgs] = {
    "tiny": VisionMambaArgs(embed_dim=64, depth=4),
    "base": VisionMambaArgs(embed_dim=768, depth=12),
    "large": VisionMambaArgs(embed_dim=1024, depth=24),
}


def _resolve(cfg: Any, flavors: dict[str, Any]) -> dict[str, Any]:
    resolved = with_overrides(flavors[cfg.flavor], cfg)
    own_layers = getattr(cfg, "feature_layers", None) is not None
    if "feature_layers" in resolved and (
        resolved["feature_layers"] is None
        or (getattr(cfg, "depth", None) is not None and not own_layers)
    ):
        resolved["feature_layers"] = default_feature_layers(resolved["depth"])
    return resolved


def _validate_common(cfg: Any, flavors: dict[str, Any], k: str) -> None:
    check(cfg.flavor in flavors, f"{k}flavor", cfg.flavor, "one of " + ", ".join(flavors))
    check(cfg.scan in SCAN_IMPLS, f"{k}scan", cfg.scan, "one of " + ", ".join(SCAN_IMPLS))
    check(
        cfg.scan != "cuda" or cfg.use_cuda_kernels,
        f"{k}scan",
        cfg.scan,
        "auto, reference or chunked while use_cuda_kernels is false",
    )
    for name in ("embed_dim", "depth", "patch_size", "d_state"):
        value = getattr(cfg, name)
        check(value is None or value > 0, f"{k}{name}", value, "a positive integer")


@dataclass(kw_only=True)
class VisionMambaARGConfig:
    """The `model` section for ``name: vision_mamba_arg``: a flavor plus optional overrides."""

    flavor: str = "base"
    embed_dim: int | None = None
    depth: int | None = None
    patch_size: int | None = None
    d_state: int | None = None
    feature_layers: tuple[int, ...] | None = None  # 4 layers (1-based) the decoder reads
    decoder_dim: int | None = None
    decoder_heads: int | None = None
    use_cuda_kernels: bool = True  # mamba-ssm's scan on GPUs when it is installed
    # auto: mamba-ssm's kernel on GPUs when it imports, else the chunked scan; the reference
    # on CPU. reference | chunked | cuda force one (cuda: mamba-ssm's, the reference on CPU).
    scan: str = "auto"
    grad_checkpointing: bool = False  # recompute each block in backward: less memory

    def resolved(self) -> dict[str, Any]:
        return _resolve(self, VISION_MAMBA_ARG_FLAVORS)

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        _validate_common(self, VISION_MAMBA_ARG_FLAVORS, k)
        r = self.resolved()
        layers = tuple(r["feature_layers"])
        check(
            len(layers) == NUM_FEATURE_LAYERS
            and all(1 <= a < b <= r["depth"] for a, b in itertools.pairwise(layers))
            and layers[0] >= 1
            and layers[-1] == r["depth"],
            f"{k}feature_layers",
            list(layers),
            f"{NUM_FEATURE_LAYERS} increasing layer numbers ending at depth ({r['depth']})",
        )
        check(
            r["decoder_dim"] % r["decoder_heads"] == 0 and r["decoder_dim"] % 4 == 0,
            f"{k}decoder_heads",
            r["decoder_heads"],
            f"a divisor of decoder_dim ({r['decoder_dim']}, itself a multiple of 4)",
        )
        check(r["embed_dim"] % 4 == 0, f"{k}embed_dim", r["embed_dim"], "a multiple of 4")


@dataclass(kw_only=True)
class VisionMambaConfig:
    """The `model` section for ``name: vision_mamba`` (the 4-direction encoder, stages 2-3)."""

    flavor: str = "base"
    embed_dim: int | None = None
    depth: int | None = None
    patch_size: int | None = None
    d_state: int | None = None
    use_cuda_kernels: bool = True
    scan: str = "auto"  # as in VisionMambaARGConfig
    grad_checkpointing: bool = False
    # A stage-1 `vision_mamba_arg` export (folder or its encoder.json) to start from.
    init_from: str | None = None

    def resolved(self) -> dict[str, Any]:
        return _resolve(self, VISION_MAMBA_FLAVORS)

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        _validate_common(self, VISION_MAMBA_FLAVORS, k)
        r = self.resolved()
        check(r["embed_dim"] % 4 == 0, f"{k}embed_dim", r["embed_dim"], "a multiple of 4")


# ----------------------------------------------------------------------------- stage 1


class VisionMambaEncoder(PatchGrid, nn.Module):
    """The unidirectional encoder: patches + fixed sin-cos positions, scanned cluster by
    cluster through `depth` Mamba blocks; 4 evenly spaced layers are LayerNorm'd as features.

    `forward(images)` (the encoder protocol) runs every cluster and returns the last feature
    [B, N, D] back in raster order, no prefix tokens (num_prefix_tokens = 0).
    """

    pos_embed: Tensor  # [1, N, D], raster order
    layer_stack = "layers"  # the block stack (dense evaluations hook its outputs)

    def __init__(
        self,
        *,
        image_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        patch_size: int,
        feature_layers: tuple[int, ...],
        cluster_size: int,
        d_state: int,
        d_conv: int,
        expand: int,
        use_cuda_kernels: bool = True,
        scan: str = "auto",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self._image_size = (image_size, image_size)
        self._patch_size = patch_size
        self._in_chans = in_chans
        self.cluster_size = cluster_size
        self.feature_layers = tuple(feature_layers)
        self.patch_embed = LinearPatchEmbed(
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed_2d(embed_dim, *self.grid_size, cls=False)[None],
            persistent=True,
        )
        self.layers = _mixers(
            embed_dim, depth, Mamba, d_state=d_state, d_conv=d_conv, expand=expand,
            use_cuda_kernels=use_cuda_kernels, scan_impl=scan,
        )  # fmt: skip
        _set_grad_checkpointing(self.layers, grad_checkpointing)
        self.feature_norms = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in feature_layers)
        self.init_weights()

    @property
    def embed_dim(self) -> int:
        return self.pos_embed.shape[-1]

    @property
    def num_prefix_tokens(self) -> int:
        return 0  # unidirectional: no CLS

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward (timm's name for it)."""
        _set_grad_checkpointing(self.layers, enable)

    @property
    def num_clusters(self) -> int:
        gh, gw = self.grid_size
        return (gh // self.cluster_size) * (gw // self.cluster_size)

    @property
    def tokens_per_cluster(self) -> int:
        return self.cluster_size**2

    def init_weights(self) -> None:
        """A no-op on the meta device (call again after `to_empty`)."""
        if is_meta(self):
            return
        with torch.no_grad():
            self.pos_embed.copy_(
                sincos_pos_embed_2d(self.embed_dim, *self.grid_size, cls=False)[None]
            )
        for block in self.layers:
            cast(MambaBlock, block).mixer.reset_parameters()
        _init_mamba_stack(self, len(self.layers))

    def forward_features(self, images: Tensor, num_clusters: int | None = None) -> list[Tensor]:
        """images [B, C, H, W] -> 4 LayerNorm'd features [B, k·T, D] of the first k clusters
        (all with None), in cluster order."""
        if tuple(images.shape[-2:]) != self._image_size:
            raise ValueError(
                f"encoder built for {self._image_size} images, got {tuple(images.shape[-2:])}"
            )
        x = self.patch_embed(images) + self.pos_embed.to(images.dtype)  # [B, N, D] raster
        order = cluster_order(self.grid_size, self.cluster_size, images.device)
        k = self.num_clusters if num_clusters is None else num_clusters
        x = x[:, order[: k * self.tokens_per_cluster]]  # [B, k·T, D] cluster order
        features = []
        for i, block in enumerate(self.layers, start=1):
            x = block(x)
            if i in self.feature_layers:
                features.append(x)
        return [norm(f) for norm, f in zip(self.feature_norms, features, strict=True)]

    def forward(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] -> tokens [B, N, D], raster order (the encoder protocol)."""
        return self.layer_patches(self.forward_features(images)[-1])

    def layer_patches(self, tokens: Tensor) -> Tensor:
        """A block's output [B, N, D] (cluster order) -> its patches [B, N, D] in raster
        order (how `evaluation.dense` reads intermediate layers)."""
        order = cluster_order(self.grid_size, self.cluster_size, tokens.device)
        return tokens[:, torch.argsort(order)]


class CrossAttentionBlock(nn.Module):
    """q = q + Attn(LN(q), LN(kv), mask); q = q + MLP(LN(q)). No self-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def attend(self, q: Tensor, kv: Tensor, mask: Tensor) -> Tensor:
        """q [B, Q, E], kv [B, M, E], mask bool [Q, M] (True = attend) -> [B, Q, E]."""
        b, nq, e = q.shape
        h = self.num_heads
        query = self.q(q).view(b, nq, h, e // h).transpose(1, 2)  # [B, h, Q, e/h]
        key, value = self.kv(kv).view(b, -1, 2, h, e // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, nq, e))

    def forward(self, q: Tensor, kv: Tensor, mask: Tensor) -> Tensor:
        q = q + self.attend(self.norm_q(q), self.norm_kv(kv), mask)
        return q + self.mlp(self.norm_mlp(q))


class ARGDecoder(nn.Module):
    """Next-cluster pixel predictor: 4 encoder features [B, M, D] -> pred [B, M, p·p·C].

    The features are concatenated and mapped by one Linear(4D -> 4E) into four E-dim streams;
    decoder block i cross-attends to stream i. Its queries are a learned token plus fixed
    sin-cos positions of the target patches (clusters 1..K-1), and the causal-over-clusters
    mask lets the query for cluster k+1 see encoder clusters <= k only.
    """

    pos_embed: Tensor  # [1, N, E], raster order

    def __init__(
        self,
        *,
        grid_size: tuple[int, int],
        cluster_size: int,
        patch_size: int,
        in_chans: int,
        encoder_dim: int,
        embed_dim: int,
        num_heads: int,
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.cluster_size = cluster_size
        self.enc2dec = nn.Linear(NUM_FEATURE_LAYERS * encoder_dim, NUM_FEATURE_LAYERS * embed_dim)
        self.ar_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed_2d(embed_dim, *grid_size, cls=False)[None],
            persistent=True,
        )
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(embed_dim, num_heads) for _ in range(NUM_FEATURE_LAYERS)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.pred = nn.Linear(embed_dim, patch_size * patch_size * in_chans)
        self.init_weights()

    def init_weights(self) -> None:
        if is_meta(self):
            return
        with torch.no_grad():
            self.pos_embed.copy_(
                sincos_pos_embed_2d(self.pos_embed.shape[-1], *self.grid_size, cls=False)[None]
            )
        init_mae_weights(self)
        trunc_normal_(self.ar_token, std=0.02)

    def forward(self, features: list[Tensor]) -> Tensor:
        """features: 4 x [B, M, D] (clusters 0..K-2) -> pred [B, M, p·p·C] (clusters 1..K-1)."""
        x = self.enc2dec(torch.cat(features, dim=-1))  # [B, M, 4E]
        b, m, _ = x.shape
        e = self.ar_token.shape[-1]
        # Stream i takes every 4th channel from i (the official code's reshape(..., E, 4)).
        streams = x.view(b, m, e, NUM_FEATURE_LAYERS).unbind(-1)  # 4 x [B, M, E]
        t = self.cluster_size**2
        order = cluster_order(self.grid_size, self.cluster_size, x.device)
        queries = self.ar_token + self.pos_embed[:, order[t : t + m]].to(x.dtype)  # [1, M, E]
        q = queries.expand(b, -1, -1)
        mask = cluster_causal_mask(m // t, t, x.device)  # [M, M]
        for block, kv in zip(self.blocks, streams, strict=True):
            q = block(q, kv, mask)
        return self.pred(self.norm(q))


class VisionMambaARG(nn.Module):
    """MambaXray-VL stage 1: `encoder` (what gets exported) and `decoder`.

    forward(images) -> (loss, pred): the encoder reads clusters 0..K-2, the decoder predicts
    clusters 1..K-1, the loss is MSE to their (per-patch normalised) pixels.
    """

    encoder: VisionMambaEncoder
    decoder: ARGDecoder

    def __init__(self, encoder: VisionMambaEncoder, decoder: ARGDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    # Geometry lives on the encoder (patch_size, grid_size, ...), deliberately not here:
    # MAE-style objectives recognise their models by these names, and this one is not one.
    @property
    def num_clusters(self) -> int:
        return self.encoder.num_clusters

    def init_weights(self) -> None:
        self.encoder.init_weights()
        self.decoder.init_weights()

    def forward_encoder(self, images: Tensor) -> list[Tensor]:
        """images [B, C, H, W] -> 4 features [B, M, D] of clusters 0..K-2."""
        return self.encoder.forward_features(images, num_clusters=self.num_clusters - 1)

    def forward_decoder(self, features: list[Tensor]) -> Tensor:
        """4 x [B, M, D] -> pred [B, M, p·p·C] for clusters 1..K-1."""
        return self.decoder(features)

    def targets(self, images: Tensor, *, norm_pix_loss: bool = True) -> Tensor:
        """images [B, C, H, W] -> pixels of clusters 1..K-1 [B, M, p·p·C], float32, each
        patch standardised by its own mean and variance with `norm_pix_loss`."""
        enc = self.encoder
        target = patchify(images, enc.patch_size).float()  # [B, N, p·p·C] raster
        if norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        order = cluster_order(enc.grid_size, enc.cluster_size, images.device)
        return target[:, order[enc.tokens_per_cluster :]]

    def forward_loss(self, images: Tensor, pred: Tensor, *, norm_pix_loss: bool = True) -> Tensor:
        """Mean squared error over every predicted pixel: images [B,C,H,W], pred [B,M,p·p·C]."""
        target = self.targets(images, norm_pix_loss=norm_pix_loss)
        return ((pred.float() - target) ** 2).mean()

    def forward(self, images: Tensor, *, norm_pix_loss: bool = True) -> tuple[Tensor, Tensor]:
        pred = self.forward_decoder(self.forward_encoder(images))
        return self.forward_loss(images, pred, norm_pix_loss=norm_pix_loss), pred


def _check_arg_image_size(image_size: int, patch_size: int, cluster_size: int) -> None:
    side = patch_size * cluster_size
    if image_size <= 0 or image_size % side or image_size // side < 2:
        raise ConfigError(
            "data.resolution",
            image_size,
            f"a multiple of {side} px ({cluster_size}x{cluster_size} clusters of "
            f"{patch_size}-px patches), at least {2 * side} px so there is a cluster to predict",
        )


@MODELS.register("vision_mamba_arg", VisionMambaARGConfig)
def build_vision_mamba_arg(
    cfg: VisionMambaARGConfig, *, image_size: int, in_chans: int
) -> VisionMambaARG:
    """Build from the model section; image size and channels come from the data section."""
    cfg.validate("model")
    a = VisionMambaARGArgs(**cfg.resolved())
    _check_arg_image_size(image_size, a.patch_size, a.cluster_size)
    if in_chans < 1:
        raise ValueError(f"in_chans must be at least 1, got {in_chans}")
    assert a.feature_layers is not None
    encoder = VisionMambaEncoder(
        image_size=image_size,
        in_chans=in_chans,
        embed_dim=a.embed_dim,
        depth=a.depth,
        patch_size=a.patch_size,
        feature_layers=a.feature_layers,
        cluster_size=a.cluster_size,
        d_state=a.d_state,
        d_conv=a.d_conv,
        expand=a.expand,
        use_cuda_kernels=cfg.use_cuda_kernels,
        scan=cfg.scan,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    decoder = ARGDecoder(
        grid_size=encoder.grid_size,
        cluster_size=a.cluster_size,
        patch_size=a.patch_size,
        in_chans=in_chans,
        encoder_dim=a.embed_dim,
        embed_dim=a.decoder_dim,
        num_heads=a.decoder_heads,
    )
    return VisionMambaARG(encoder, decoder)


# ----------------------------------------------------------------------------- stages 2-3


def column_order_with_middle_cls(grid: tuple[int, int], device: Any = None) -> Tensor:
    """[N+1] permutation from the row-major sequence (CLS at N//2) to the column-major one
    (CLS again at N//2): `x[:, perm]` reads the patches column by column."""
    gh, gw = grid
    n = gh * gw
    mid = n // 2
    by_column = torch.arange(n, device=device).view(gh, gw).t().reshape(-1)  # patch ids
    position = by_column + (by_column >= mid).long()  # where each patch sits in the sequence
    cls = torch.tensor([mid], device=device)
    return torch.cat([position[:mid], cls, position[mid:]])


class BiVisionMambaEncoder(LayerIds, PatchGrid, nn.Module):
    """The 4-direction Vision Mamba encoder of MambaXray-VL stages 2-3.

    The CLS token sits in the middle of the sequence (N//2) while the blocks run, with
    learned positions [1, N+1, D] (CLS's slot in the middle too); `forward` returns it first.
    """

    layer_stack = "layers"

    def __init__(
        self,
        *,
        image_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        patch_size: int,
        d_state: int,
        d_conv: int,
        expand: int,
        use_cuda_kernels: bool = True,
        scan: str = "auto",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self._image_size = (image_size, image_size)
        self._patch_size = patch_size
        self._in_chans = in_chans
        n = self.num_patches
        self.patch_embed = LinearPatchEmbed(
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.layers = _mixers(
            embed_dim, depth, Mamba4D, d_state=d_state, d_conv=d_conv, expand=expand,
            use_cuda_kernels=use_cuda_kernels, scan_impl=scan,
        )  # fmt: skip
        _set_grad_checkpointing(self.layers, grad_checkpointing)
        self.norm = nn.LayerNorm(embed_dim)
        self.init_weights()

    @property
    def embed_dim(self) -> int:
        return self.cls_token.shape[-1]

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # CLS, returned first

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in backward (timm's name for it)."""
        _set_grad_checkpointing(self.layers, enable)

    @property
    def cls_index(self) -> int:
        """Where CLS sits inside the sequence the blocks see."""
        return self.num_patches // 2

    def init_weights(self) -> None:
        """From scratch: sin-cos positions (CLS slot zero), CLS ~ N(0, 0.02). A no-op on meta."""
        if is_meta(self):
            return
        with torch.no_grad():
            table = sincos_pos_embed_2d(self.embed_dim, *self.grid_size, cls=False)
            self.pos_embed.copy_(_insert_row(table, self.cls_index)[None])
        trunc_normal_(self.cls_token, std=0.02)
        for block in self.layers:
            cast(MambaBlock, block).mixer.reset_parameters()
        _init_mamba_stack(self, len(self.layers))

    def forward(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] -> tokens [B, 1+N, D], CLS first then patches in raster order."""
        if tuple(images.shape[-2:]) != self._image_size:
            raise ValueError(
                f"encoder built for {self._image_size} images, got {tuple(images.shape[-2:])}"
            )
        x = self.patch_embed(images)  # [B, N, D]
        mid = self.cls_index
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1) + self.pos_embed.to(x.dtype)
        column_order = column_order_with_middle_cls(self.grid_size, images.device)
        for block in self.layers:
            x = block(x, column_order=column_order)
        x = self.norm(x)
        return torch.cat([x[:, mid : mid + 1], self.layer_patches(x)], dim=1)

    def layer_patches(self, tokens: Tensor) -> Tensor:
        """A block's output [B, N+1, D] (CLS in the middle) -> its patches [B, N, D] in
        raster order (how `evaluation.dense` reads intermediate layers)."""
        mid = self.cls_index
        return torch.cat([tokens[:, :mid], tokens[:, mid + 1 :]], dim=1)


def _insert_row(table: Tensor, index: int) -> Tensor:
    """[N, D] -> [N+1, D] with a zero row at `index`."""
    zero = table.new_zeros(1, table.shape[-1])
    return torch.cat([table[:index], zero, table[index:]])


def init_from_arg(encoder: BiVisionMambaEncoder, state: dict[str, Tensor]) -> None:
    """Initialise a 4-direction encoder from a stage-1 `VisionMambaEncoder` state dict.

    Patch embedding, block norms, SwiGLUs and in/out projections are copied; each mixer's scan
    parameters go into all four branches; the fixed stage-1 positions are resized bicubically
    to the new grid (12x12 -> 14x14 for 192 -> 224 px) with a zero slot for CLS in the
    middle. Stage 1 has no CLS token and no final norm, so both start afresh (CLS ~ N(0,
    0.02), LayerNorm weight 1, bias 0), as in the official code: ARM's
    Finetuning/main_finetune.py and MambaXray-VL's models/MambaXrayVL_CLIP.py load the
    pretraining checkpoint with strict=False, leaving Finetuning/models_mamba.py's `cls_token`
    and `norm_f` as constructed (stage 1's feature norms feed its decoder only).
    """
    depth = len(encoder.layers)
    src_depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    if src_depth != depth:
        raise ValueError(f"stage-1 encoder has {src_depth} layers, this one {depth}")
    own: dict[str, Tensor] = {}
    for name, value in state.items():
        if name.startswith("patch_embed."):
            own[name] = value
    for i, block in enumerate(encoder.layers):
        mixer4d = cast(Mamba4D, cast(MambaBlock, block).mixer)
        prefix = f"layers.{i}."
        layer = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        mixer = {k[len("mixer.") :]: v for k, v in layer.items() if k.startswith("mixer.")}
        mixer4d.load_unidirectional(mixer)
        for k, v in layer.items():
            if not k.startswith("mixer."):
                own[prefix + k] = v

    src = state["pos_embed"][0].float()  # [N1, D] raster
    side = math.isqrt(src.shape[0])
    if side * side != src.shape[0]:
        raise ValueError(f"stage-1 positions of {src.shape[0]} patches are not a square grid")
    gh, gw = encoder.grid_size
    grid = src.t().reshape(1, -1, side, side)  # [1, D, side, side]
    resized = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    table = resized.reshape(-1, gh * gw).t()  # [N, D]
    own["pos_embed"] = _insert_row(table, encoder.cls_index)[None]

    missing, unexpected = encoder.load_state_dict(own, strict=False)
    trunc_normal_(encoder.cls_token, std=0.02)
    encoder.norm.reset_parameters()
    # Mixers were loaded above and CLS / the final norm start afresh; everything else must
    # have come from `own`.
    fresh = ("cls_token", "norm.weight", "norm.bias")
    missing = [k for k in missing if ".mixer." not in k and k not in fresh]
    if missing or unexpected:
        raise ValueError(f"stage-1 weights do not fit: missing {missing}, unexpected {unexpected}")


def load_arg_export(encoder: BiVisionMambaEncoder, path: str | Path) -> None:
    """`init_from_arg` with the weights of a stage-1 export folder (or its encoder.json)."""
    import json

    from safetensors.torch import load_file

    from raydiology.train.export import SPEC, WEIGHTS

    path = Path(path).expanduser()
    folder = path.parent if path.suffix == ".json" else path
    spec = json.loads((folder / SPEC).read_text())
    if spec.get("model", {}).get("name") != "vision_mamba_arg":
        raise ValueError(f"{folder}: not a vision_mamba_arg export (model {spec.get('model')})")
    init_from_arg(encoder, load_file(str(folder / WEIGHTS)))


class VisionMamba(nn.Module):
    """Holder for the stages 2-3 encoder: objectives that train "any encoder" use `encoder`."""

    encoder: BiVisionMambaEncoder

    def __init__(self, encoder: BiVisionMambaEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images)


@MODELS.register("vision_mamba", VisionMambaConfig)
def build_vision_mamba(cfg: VisionMambaConfig, *, image_size: int, in_chans: int) -> VisionMamba:
    cfg.validate("model")
    a = VisionMambaArgs(**cfg.resolved())
    check_input_geometry(image_size, in_chans, a.patch_size)
    encoder = BiVisionMambaEncoder(
        image_size=image_size,
        in_chans=in_chans,
        embed_dim=a.embed_dim,
        depth=a.depth,
        patch_size=a.patch_size,
        d_state=a.d_state,
        d_conv=a.d_conv,
        expand=a.expand,
        use_cuda_kernels=cfg.use_cuda_kernels,
        scan=cfg.scan,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    if cfg.init_from and not is_meta(encoder):
        load_arg_export(encoder, cfg.init_from)
    return VisionMamba(encoder)
