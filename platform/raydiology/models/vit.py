"""ViT encoder building blocks for X-ray MAEs: patch embeddings, fixed 2-D sin-cos positions.

The transformer blocks come from timm; what is written here is what X-ray pretraining needs
beyond a stock ViT: any number of input channels (radiographs are usually one), a choice of
patch embedding (a strided conv stack for large high-definition patches, or the classic single
linear projection), an encoder that runs on a subset of tokens (MAE's visible patches), and
construction that works on the meta device so a paper-sized model can be sized without
allocating memory.

Shapes: B batch, C channels, H×W image, p patch size, (gh, gw) patch grid, N = gh·gw
patches, K kept (visible) patches, D embedding dim.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar, Literal

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

PatchEmbedKind = Literal["conv_stack", "linear"]


def check_input_geometry(image_size: int, in_chans: int, patch_size: int) -> None:
    """What a patch encoder's builder gets from the data section, checked once for all:
    the resolution must tile into patches (the error names `data.resolution`)."""
    from raydiology.config_base import ConfigError

    if image_size <= 0 or image_size % patch_size:
        raise ConfigError(
            "data.resolution", image_size, f"a multiple of the patch size {patch_size}"
        )
    if in_chans < 1:
        raise ValueError(f"in_chans must be at least 1, got {in_chans}")


def patchify(images: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], each patch flattened row-major with channels last."""
    b, c, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    x = images.reshape(b, c, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]
    return x.reshape(b, gh * gw, p * p * c)


def select_patches(images: Tensor, ids: Tensor, p: int) -> Tensor:
    """images [B, C, H, W], ids [B, K] (row-major patch indices) -> [B*K, C, p, p]: the named
    patches as small images, in the order of `ids`; only these K patches are copied."""
    b, c, h, w = images.shape
    gh, gw = h // p, w // p
    grid = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p]
    grid = grid.reshape(b, gh * gw, c, p, p)  # a view: no copy yet
    rows = torch.arange(b, device=ids.device)[:, None]  # [B, 1]
    return grid[rows, ids].reshape(b * ids.shape[1], c, p, p)


def unpatchify(patches: Tensor, p: int, grid: tuple[int, int], c: int) -> Tensor:
    """[B, N, p*p*C] -> [B, C, gh*p, gw*p]; the inverse of `patchify`."""
    b, n, _ = patches.shape
    gh, gw = grid
    if n != gh * gw:
        raise ValueError(f"{n} patches do not fill a {gh}x{gw} grid")
    x = patches.reshape(b, gh, gw, p, p, c)
    x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, gh, p, gw, p]
    return x.reshape(b, c, gh * p, gw * p)


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[M] positions -> [M, dim]: sines of all frequencies, then cosines (as in Transformer/MAE)."""
    freqs = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / (10000.0**freqs)  # [dim/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, cls: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position table: [grid_h*grid_w (+1 with cls), dim], float32.

    The first half of each vector encodes the patch's row, the second half its column; the
    CLS slot (first, when `cls`) is all zeros. Written in torch so that, under
    ``with torch.device("meta")``, it yields a meta tensor instead of failing.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a dim divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float64)
    cols = torch.arange(grid_w, dtype=torch.float64)
    row_of, col_of = torch.meshgrid(rows, cols, indexing="ij")  # [gh, gw] each
    table = torch.cat(
        [_sincos_1d(dim // 2, row_of.reshape(-1)), _sincos_1d(dim // 2, col_of.reshape(-1))],
        dim=1,
    )  # [gh*gw, dim]
    if cls:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype, device=table.device), table])
    return table.float()


class ConvStackPatchEmbed(nn.Sequential):
    """HD-MAE's patch embedding: two strided convs then a 1x1 conv, [B,C,H,W] -> [B,N,D].

    Conv(C→D, k=p/4, s=p/4) + ReLU → Conv(D→D, k=4, s=4) + ReLU → Conv(D→D, 1x1). A 64-px
    patch is thus seen as a 4x4 grid of 16-px cells before it becomes one token.
    """

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        if patch_size % 4:
            raise ValueError(
                f"conv_stack patch embedding needs patch_size % 4 == 0, got {patch_size}"
            )
        cell = patch_size // 4
        super().__init__(
            nn.Conv2d(in_chans, embed_dim, kernel_size=cell, stride=cell),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim, embed_dim, kernel_size=4, stride=4),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim, embed_dim, kernel_size=1),
        )

    def forward(self, images: Tensor) -> Tensor:
        return super().forward(images).flatten(2).transpose(1, 2)  # [B, D, gh, gw] -> [B, N, D]


class LinearPatchEmbed(nn.Module):
    """The classic ViT patch embedding, Conv(C→D, k=p, s=p): [B,C,H,W] -> [B,N,D]."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


# Each is patch-local (kernels equal strides), so a patch can be embedded on its own.
PATCH_EMBEDS: dict[str, type[nn.Module]] = {
    "conv_stack": ConvStackPatchEmbed,
    "linear": LinearPatchEmbed,
}


def vit_blocks(*, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    """`depth` timm pre-norm blocks with qkv bias and LayerNorm(eps=1e-6), as in MAE."""
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)  # type: ignore[arg-type]
        for _ in range(depth)
    )


def init_mae_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


# Parameters before the first block: depth 0 for layer-wise lr decay.
_EMBEDDINGS = frozenset({"patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens"})


class LayerIds:
    """Each parameter's depth in a ViT-style encoder, for layer-wise lr decay
    (`train.schedules.layer_lr_multipliers`). DINOv2's rule (dinov2/utils/param_groups.py,
    get_vit_lr_decay_rate): 0 for the patch embedding, positions and tokens, i+1 for block
    i, num_layers+1 for the rest (the final norm). Mixed into encoders whose repeated
    blocks are the ModuleList named by `layer_stack`.
    """

    layer_stack: ClassVar[str] = "blocks"

    @property
    def num_layers(self) -> int:
        return len(getattr(self, self.layer_stack))

    def layer_id(self, name: str) -> int:
        """name: a parameter name relative to this encoder, e.g. "blocks.3.attn.qkv.weight"."""
        first, _, rest = name.partition(".")
        if first in _EMBEDDINGS:
            return 0
        if first == self.layer_stack:
            return int(rest.partition(".")[0]) + 1
        return self.num_layers + 1


class PatchGrid:
    """An encoder's geometry, readable without running it (part of the encoder protocol).

    Mixed into encoders that set `_image_size`, `_patch_size`, `_in_chans` in `__init__`.
    """

    _image_size: tuple[int, int]
    _patch_size: int
    _in_chans: int

    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self._image_size
        return (h // self._patch_size, w // self._patch_size)

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    @property
    def in_chans(self) -> int:
        return self._in_chans


class ViTEncoder(LayerIds, PatchGrid, nn.Module):
    """A ViT over a fixed patch grid with a CLS token and fixed sin-cos positions.

    `forward(images, ids_keep)` embeds only the patches named in `ids_keep` (MAE's visible
    patches), prepends CLS and runs the blocks: cost scales with K, not N, patch embedding
    included (every embedding in `PATCH_EMBEDS` must be patch-local: kernels equal strides).
    `pos_embed` is a persistent buffer: saved with the weights, never trained or counted.
    """

    pos_embed: Tensor  # [1, 1+N, D]

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        patch_embed: PatchEmbedKind = "conv_stack",
    ) -> None:
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
        self._image_size = (h, w)
        self._patch_size = patch_size
        self._in_chans = in_chans

        self.patch_embed = PATCH_EMBEDS[patch_embed](
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(embed_dim, *self.grid_size)[None], persistent=True
        )  # [1, 1+N, D]
        self.blocks = vit_blocks(
            dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    @property
    def embed_dim(self) -> int:
        return self.cls_token.shape[-1]

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # CLS

    def init_weights(self) -> None:
        """MAE's init; a no-op on the meta device (call again after `to_empty`)."""
        if is_meta(self):
            return
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.embed_dim, *self.grid_size)[None])
        init_mae_weights(self)
        # Patch-embedding convs are initialised like the linear maps they are.
        for m in self.patch_embed.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, images: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """images [B, C, H, W], ids_keep [B, K] or None (all N) -> tokens [B, 1+K, D], CLS first."""
        if tuple(images.shape[-2:]) != self._image_size:
            raise ValueError(
                f"encoder built for {self._image_size} images, got {tuple(images.shape[-2:])}"
            )
        if ids_keep is None:
            x = self.patch_embed(images)  # [B, N, D]
            pos = self.pos_embed.to(x.dtype)  # [1, 1+N, D]
            x = x + pos[:, 1:]
        else:
            # Only the visible patches are embedded: both patch embeddings are patch-local
            # (kernels equal strides), and HD-MAE keeps 46 of 400, so embedding the masked
            # ones too spent ~88 % of the patch embedding's 8.8 GMAC per image for nothing.
            b, k = ids_keep.shape
            x = self.patch_embed(select_patches(images, ids_keep, self._patch_size))
            x = x.reshape(b, k, -1)  # [B*K, 1, D] -> [B, K, D]
            pos = self.pos_embed.to(x.dtype)
            x = x + pos[0, 1:][ids_keep]  # each kept patch gets its own grid position
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, 1+K, D]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
