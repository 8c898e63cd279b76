"""Which patches an MAE sees: MAE's random masking and HD-MAE's context-aware masking.

Context-aware masking (HD-MAE paper): in a chest radiograph the lungs and heart sit in a known
central region. Masking that region much harder than the surroundings (95% vs 85% by default)
forces the encoder to infer anatomy from very little of it. At 1280/64 (a 20x20 grid) the
default region covers rows 6-15 x columns 3-15 (130 patches): 6 visible inside, 40 outside,
46 visible in all and 354 masked.

Every sample in a batch keeps the same number K of visible patches, so the encoder input is a
dense [B, 1+K, D] tensor. All choices are vectorised over the batch and reproducible under a
seeded `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from raydiology.config_base import ConfigError, check

# int(N * (1 - ratio)) must not lose a patch to float error (e.g. 20 * (1 - 0.95) = 0.99999...).
_EPS = 1e-6


@dataclass(kw_only=True)
class MaskingConfig:
    """How patches are hidden; the `objective.masking` section."""

    strategy: Literal["random", "context_aware"] = "context_aware"
    ratio: float = 0.75  # random: masked fraction
    inside_ratio: float = 0.95  # context_aware: masked fraction inside the region
    outside_ratio: float = 0.85  # ... and outside it
    # (top, left, bottom, right) in normalised image coordinates; a patch is inside when its
    # centre is. The default is the paper's chest region at 20x20.
    region: tuple[float, float, float, float] = (0.3, 0.15, 0.8, 0.8)
    # A corpus column with a per-image box (top, left, bottom, right), normalised like
    # `region`, in stored-image coordinates; the pipeline moves it with `data.fit` and the
    # crop/flip augmentation, and it reaches the objective as batch["region"]. A row whose
    # box is null gets `region`.
    region_column: str | None = None

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        for name in ("ratio", "inside_ratio", "outside_ratio"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"{k}{name}", value, "a fraction in [0, 1)")
        top, left, bottom, right = self.region
        check(
            0.0 <= top < bottom <= 1.0 and 0.0 <= left < right <= 1.0,
            f"{k}region",
            self.region,
            "(top, left, bottom, right) with 0 <= top < bottom <= 1 and 0 <= left < right <= 1",
        )
        check(
            self.region_column is None or bool(self.region_column),
            f"{k}region_column",
            self.region_column,
            "a column name or null",
        )


@dataclass(frozen=True)
class Masking:
    """One batch's masking: ids_keep [B, K], ids_restore [B, N], mask [B, N] float (1 = masked).

    `ids_keep` lists the visible patches (grid indices); `ids_restore` puts a [kept..., masked...]
    sequence back into grid order (it inverts the shuffle).
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]


def region_to_grid(region: tuple[float, float, float, float], grid_h: int, grid_w: int) -> Tensor:
    """Normalised (top, left, bottom, right) -> bool [grid_h, grid_w].

    Patch (i, j) is inside iff its centre ((i+0.5)/grid_h, (j+0.5)/grid_w) lies in
    [top, bottom) x [left, right). Always a CPU tensor.
    """
    top, left, bottom, right = region
    rows = torch.tensor([top <= (i + 0.5) / grid_h < bottom for i in range(grid_h)], device="cpu")
    cols = torch.tensor([left <= (j + 0.5) / grid_w < right for j in range(grid_w)], device="cpu")
    return rows[:, None] & cols[None, :]


def boxes_to_grid(boxes: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """Per-sample boxes float [B, 4] (top, left, bottom, right) -> bool [B, grid_h, grid_w],
    by the same patch-centre rule as `region_to_grid`."""
    rows = (torch.arange(grid_h, device=boxes.device, dtype=torch.float32) + 0.5) / grid_h
    cols = (torch.arange(grid_w, device=boxes.device, dtype=torch.float32) + 0.5) / grid_w
    top, left, bottom, right = (boxes.float()[:, i, None] for i in range(4))
    inside_rows = (top <= rows) & (rows < bottom)  # [B, grid_h]
    inside_cols = (left <= cols) & (cols < right)  # [B, grid_w]
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def _keep_count(n: int, ratio: float) -> int:
    """How many of n patches stay visible at a masked fraction `ratio`: floor(n·(1-ratio))."""
    return int(n * (1.0 - ratio) + _EPS)


def _keep_counts(n: Tensor, ratio: float) -> Tensor:
    """`_keep_count` per sample: n [B] long -> [B] long."""
    return torch.floor(n.double() * (1.0 - ratio) + _EPS).long()


class MaskGenerator:
    """Draws a `Masking` per batch for a fixed patch grid.

    random: each sample keeps floor(N·(1-ratio)) patches chosen uniformly (MAE).
    context_aware: patches inside the config region are masked at `inside_ratio`, the rest at
    `outside_ratio`, each group shuffled separately, so each sample keeps
    floor(n_in·(1-inside_ratio)) + floor(n_out·(1-outside_ratio)) patches.

    Per-image regions (`region=` in `__call__`, bool [B, gh, gw] or [B, N]) move the region per
    sample but keep K fixed at the config region's count. Per sample:
        keep_in  = min(floor(n_in_i·(1-inside_ratio)), K)
        keep_out = min(K - keep_in, n_out_i)
        keep_in  = K - keep_out   (when outside runs short, the rest come from inside)
    """

    def __init__(
        self, cfg: MaskingConfig, grid_size: tuple[int, int], *, key: str = "objective.masking"
    ) -> None:
        self.cfg = cfg
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        n = self.num_patches
        self.inside: Tensor | None = None  # [N] bool, the config region (context_aware)
        if cfg.strategy == "random":
            self.num_visible = _keep_count(n, cfg.ratio)
            ratio_key, ratio = f"{key}.ratio", cfg.ratio
        elif cfg.strategy == "context_aware":
            self.inside = region_to_grid(cfg.region, *self.grid_size).reshape(-1)  # [N] bool
            n_in = int(self.inside.sum())
            self.keep_inside = _keep_count(n_in, cfg.inside_ratio)
            self.keep_outside = _keep_count(n - n_in, cfg.outside_ratio)
            self.num_visible = self.keep_inside + self.keep_outside
            ratio_key, ratio = f"{key}.outside_ratio", cfg.outside_ratio
        else:
            raise ConfigError(f"{key}.strategy", cfg.strategy, "'random' or 'context_aware'")
        if self.num_visible < 1:
            raise ConfigError(
                ratio_key,
                ratio,
                f"a ratio leaving at least one visible patch of {n} "
                f"(grid {self.grid_size[0]}x{self.grid_size[1]})",
            )
        self.num_masked = n - self.num_visible
        self.overall_ratio = self.num_masked / n

    def __call__(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        region: Tensor | None = None,
    ) -> Masking:
        """-> Masking with ids_keep [B, K], ids_restore [B, N], mask [B, N] on `device`."""
        n = self.num_patches
        noise = self._noise(batch_size, generator, device)  # [B, N] in [0, 1)
        device = noise.device
        if self.cfg.strategy == "random":
            ids_shuffle = torch.argsort(noise, dim=1)  # lowest noise first = kept
        else:
            kept = self._context_aware_kept(noise, region)  # [B, N] bool
            # Kept patches sort before masked ones (noise < 1); within each, order is random.
            ids_shuffle = torch.argsort((~kept).to(noise.dtype) + noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        k = self.num_visible
        ids_keep = ids_shuffle[:, :k]
        mask = torch.ones(batch_size, n, device=device)
        mask[:, :k] = 0.0
        mask = torch.gather(mask, 1, ids_restore)  # back to grid order
        return Masking(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)

    def _noise(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device | str | None
    ) -> Tensor:
        # Draw on the generator's own device so a CPU generator gives the same masks for any
        # target device; then move.
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(
            batch_size, self.num_patches, generator=generator, device=gen_device or "cpu"
        )
        return noise.to(device) if device is not None else noise

    def _context_aware_kept(self, noise: Tensor, region: Tensor | None) -> Tensor:
        """noise [B, N] -> bool [B, N]: the lowest-noise keep_in inside and keep_out outside."""
        b, n = noise.shape
        if region is None:
            assert self.inside is not None
            inside = self.inside.to(noise.device)[None].expand(b, n)
            keep_in = torch.full((b,), self.keep_inside, device=noise.device)
            keep_out = torch.full((b,), self.keep_outside, device=noise.device)
        else:
            inside = region.to(device=noise.device, dtype=torch.bool).reshape(b, -1)
            if inside.shape[1] != n:
                raise ValueError(
                    f"region has {inside.shape[1]} cells, expected the {n} patches of the "
                    f"{self.grid_size[0]}x{self.grid_size[1]} grid"
                )
            n_in = inside.sum(dim=1)
            total = self.num_visible
            keep_in = _keep_counts(n_in, self.cfg.inside_ratio).clamp(max=total)
            keep_out = torch.minimum(total - keep_in, n - n_in)
            keep_in = total - keep_out
        # Rank each patch within its group: inside patches sort first, by noise.
        order = torch.argsort(noise + 2.0 * (~inside).to(noise.dtype), dim=1)
        rank = torch.argsort(order, dim=1)  # [B, N] position in that order
        n_in = inside.sum(dim=1, keepdim=True)
        return torch.where(inside, rank < keep_in[:, None], rank - n_in < keep_out[:, None])
