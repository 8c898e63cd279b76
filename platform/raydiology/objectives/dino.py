"""DINOv2 self-distillation (XR-0's recipe): DINO on CLS + iBOT on masked patches + KoLeo.

A student (the model: `encoder` + `head`) learns to match an EMA teacher (a frozen copy of
both) across views of one radiograph:

- multi-crop, made on the accelerator from the batch's images: 2 global crops (XR-0: 518 px
  from 50-100% of the image) and `local_crops` local crops (196 px from 20-50%), flipped at
  random, then (`augment`) rotated, auto-contrasted, equalised and blurred per crop. The
  images can be larger than the model's input (`data.crop_source_size`), so a global crop is
  cut from the stored pixels instead of being upsampled from the 518-px input. Global and
  local crops go through the backbone as two batched forwards.
- DINO: cross-entropy between the teacher's centred, sharpened CLS distribution on one global
  crop and the student's on every other crop.
- iBOT: block-wise masks on half the global crops (ratios spread over [0.1, 0.5]); the student
  sees mask tokens where the teacher sees patches, and matches the teacher's distribution there.
- KoLeo: spreads the student's normalised CLS features of each global crop over the sphere.

The teacher's weights are fp32 *buffers*, not parameters: the optimizer never sees them,
DeepSpeed's bf16/fp16 cast (parameters only) leaves them in fp32 so tiny EMA steps are not
rounded away, ZeRO never partitions them, and checkpoints carry them for a resume. `encoder`
returns the teacher's backbone, what DINOv2 evaluates and what gets exported.

Shapes: B images, C channels, R input side, G = 2 global crops, L local crops, N patches of a
global crop, M masked patches in the batch, D embedding dim, K prototypes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydiology.config_base import check
from raydiology.data.views import ViewAugment, augment_views
from raydiology.models.dinov2 import DINOv2Model
from raydiology.registry import OBJECTIVES
from raydiology.train import collectives

GLOBAL_CROPS = 2  # DINO's loss pairs each global crop with the other one

# module -> its (name, weight) pairs, e.g. the optimizer's fp32 master copy of each parameter
WeightReader = Callable[[nn.Module], Iterable[tuple[str, Tensor]]]


@dataclass(kw_only=True)
class DINOv2ObjectiveConfig:
    """The `objective` section for ``name: dinov2``. Defaults are XR-0's values.

    Crop sizes are given at the recipe's scale and rounded to whole patches. When the input
    (data.resolution) is smaller than a global crop, both sizes shrink by
    resolution / global_crop_size, so a smoke run at 128 px keeps the recipe's proportions
    (global 128, local 48) instead of upsampling to 518.
    """

    global_crop_size: int = 518
    global_crop_scale: tuple[float, float] = (0.5, 1.0)  # fraction of the image area
    local_crops: int = 8
    local_crop_size: int = 196
    local_crop_scale: tuple[float, float] = (0.2, 0.5)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range, as RandomResizedCrop
    hflip_prob: float = 0.5
    # Per-crop rotation / intensity / blur (raydiology.data.views); all off by default.
    augment: ViewAugment = field(default_factory=ViewAugment)
    # How the batch's images are normalised (copy data.mean / data.std; checked against them).
    # When set, crops are cut and augmented as [0, 1] intensities of the first channel and
    # normalised afterwards; `augment` needs them. Null = crops cut from the images as they come.
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    # EMA teacher: momentum cosine from `momentum_teacher` to `momentum_teacher_end`
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    # teacher temperature: linear warm-up over the first `teacher_temp_warmup` of the run
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.3  # fraction of train.max_steps (DINOv2: 30 of 100 epochs)
    student_temp: float = 0.1
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    center_momentum: float = 0.9
    # loss weights
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    # iBOT masking of the student's global crops
    mask_probability: float = 0.5  # share of global crops that get a mask
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_min_block: int = 4  # patches in the smallest block

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        for name in ("global_crop_size", "local_crop_size", "mask_min_block"):
            check(getattr(self, name) >= 1, f"{k}{name}", getattr(self, name), "at least 1")
        check(self.local_crops >= 0, f"{k}local_crops", self.local_crops, ">= 0")
        for name in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(self, name)
            check(0 < lo <= hi <= 1, f"{k}{name}", [lo, hi], "0 < min <= max <= 1")
        lo, hi = self.crop_ratio
        check(0 < lo <= hi, f"{k}crop_ratio", [lo, hi], "0 < min <= max")
        lo, hi = self.mask_ratio
        check(0 <= lo <= hi <= 1, f"{k}mask_ratio", [lo, hi], "0 <= min <= max <= 1")
        for name in ("hflip_prob", "mask_probability", "teacher_temp_warmup"):
            value = getattr(self, name)
            check(0 <= value <= 1, f"{k}{name}", value, "a value in [0, 1]")
        check(
            0 <= self.momentum_teacher <= self.momentum_teacher_end <= 1,
            f"{k}momentum_teacher",
            [self.momentum_teacher, self.momentum_teacher_end],
            "0 <= momentum_teacher <= momentum_teacher_end <= 1",
        )
        for name in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
            value = getattr(self, name)
            check(value > 0, f"{k}{name}", value, "a positive temperature")
        check(
            0 <= self.center_momentum < 1,
            f"{k}center_momentum",
            self.center_momentum,
            "a value in [0, 1)",
        )
        for name in ("dino_weight", "ibot_weight", "koleo_weight"):
            check(getattr(self, name) >= 0, f"{k}{name}", getattr(self, name), ">= 0")
        self.augment.validate(f"{k}augment")
        a = self.augment
        augments = a.rotation_prob > 0 or a.changes_intensity or any(p > 0 for p in a.blur_prob)
        check(
            not augments or (self.input_mean is not None and self.input_std is not None),
            f"{k}input_mean",
            self.input_mean,
            "data.mean (and input_std data.std) when `augment` is on: it works on intensities",
        )
        if self.input_mean is not None or self.input_std is not None:
            mean, std = self.input_mean or (), self.input_std or ()
            check(
                len(mean) == len(std) >= 1 and all(v > 0 for v in std),
                f"{k}input_std",
                list(std),
                "one positive value per input_mean value",
            )


# ---------------------------------------------------------------------------- schedules


def momentum_at(step: int, max_steps: int, *, start: float, end: float) -> float:
    """EMA momentum for 0-based iteration `step`: cosine from `start` to `end` (DINOv2)."""
    progress = min(1.0, step / max(1, max_steps))
    return end - (end - start) * 0.5 * (1 + math.cos(math.pi * progress))


def teacher_temp_at(step: int, max_steps: int, cfg: DINOv2ObjectiveConfig) -> float:
    """Teacher temperature at optimizer step `step`: linear from `warmup_teacher_temp` to
    `teacher_temp` over the first `teacher_temp_warmup` of `max_steps`, then flat.

    max_steps 0 means "not known yet" (before the first step): the warm-up's start.
    """
    if cfg.teacher_temp_warmup == 0:
        return cfg.teacher_temp
    warmup = cfg.teacher_temp_warmup * max_steps
    if max_steps > 0 and step >= warmup:
        return cfg.teacher_temp
    progress = step / warmup if warmup > 0 else 0.0
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * progress


# ---------------------------------------------------------------------------- multi-crop


def crop_sizes(cfg: DINOv2ObjectiveConfig, *, image_size: int, patch_size: int) -> tuple[int, int]:
    """(global, local) crop sides in pixels, whole patches, scaled down to small inputs."""
    g, loc = float(cfg.global_crop_size), float(cfg.local_crop_size)
    if g > image_size:
        loc, g = loc * image_size / g, float(image_size)

    def snap(side: float) -> int:
        return max(patch_size, round(side / patch_size) * patch_size)

    return snap(g), snap(loc)


def sample_crop_boxes(
    n: int,
    *,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    attempts: int = 10,
) -> Tensor:
    """RandomResizedCrop's boxes for `n` crops of a size×size image: [n, 4] (x0, y0, x1, y1).

    Area ~ U(scale)·size², log aspect ~ U(log ratio); the first of `attempts` draws that fits
    wins, else the whole image (torchvision's rule, for a square image). Sub-pixel boxes:
    `roi_align` samples them exactly.
    """

    def uniform(lo: float, hi: float, shape: tuple[int, ...]) -> Tensor:
        u = torch.rand(shape, generator=generator, device=device)
        return lo + (hi - lo) * u

    area = uniform(*scale, (n, attempts)) * size * size
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts)))
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= size) & (h <= size)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # first fitting draw (0 if none)
    found = fits.any(dim=1)
    full = torch.full_like(found, size, dtype=w.dtype)
    w = torch.where(found, w.gather(1, first)[:, 0], full)
    h = torch.where(found, h.gather(1, first)[:, 0], full)
    x0 = uniform(0.0, 1.0, (n,)) * (size - w)
    y0 = uniform(0.0, 1.0, (n,)) * (size - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


@torch.no_grad()
def multi_crop(
    images: Tensor,
    crops: int,
    *,
    out_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip_prob: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """images [B, C, R, R] -> crops [crops·B, C, S, S], crop-major (all images' first crop,
    then their second, ...), each resized with area averaging and flipped with `hflip_prob`.

    One batched `roi_align` on the images' device; computed in float32, returned in the
    images' dtype.
    """
    from torchvision.ops import roi_align

    b, _, r, r2 = images.shape
    if r != r2:
        raise ValueError(f"multi-crop expects square images, got {r}x{r2}")
    n = crops * b
    boxes = sample_crop_boxes(
        n, size=r, scale=scale, ratio=ratio, generator=generator, device=images.device
    )
    owner = torch.arange(b, device=images.device, dtype=boxes.dtype).repeat(crops)  # [n]
    rois = torch.cat([owner[:, None], boxes], dim=1)  # [n, 5]: image index, box
    out = roi_align(images.float(), rois, output_size=out_size, sampling_ratio=-1, aligned=True)
    flip = torch.rand(n, generator=generator, device=images.device) < hflip_prob
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.to(images.dtype)


# ---------------------------------------------------------------------------- iBOT masks


def block_mask(
    grid: tuple[int, int],
    count: int,
    rng: random.Random,
    *,
    min_block: int = 4,
    max_block: int | None = None,
) -> np.ndarray:
    """A [gh, gw] bool mask with exactly `count` True cells, laid as rectangular blocks.

    BEiT's block masking, as DINOv2's MaskingGenerator: blocks of random area (at least
    `min_block` patches while that many remain, at most `max_block`) and aspect ratio in
    [0.3, 1/0.3] until `count` is reached; a block adds at most that many new cells (one that
    would overshoot is cut short), and cells still missing after 100 blocks are drawn at random.
    """
    gh, gw = grid
    count = min(count, gh * gw)
    cap = gh * gw if max_block is None else max(1, max_block)
    mask = np.zeros((gh, gw), dtype=bool)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(100):
        remaining = count - int(mask.sum())
        if remaining <= 0:
            break
        most = min(remaining, cap)
        area = rng.uniform(min(min_block, most), most)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = min(gh, max(1, round(math.sqrt(area * aspect))))
        w = min(gw, max(1, round(math.sqrt(area / aspect))))
        top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
        free = np.argwhere(~mask[top : top + h, left : left + w])[:most]
        mask[top + free[:, 0], left + free[:, 1]] = True
    remaining = count - int(mask.sum())
    if remaining > 0:
        chosen = rng.sample(np.flatnonzero(~mask).tolist(), remaining)
        mask.flat[chosen] = True
    return mask


# Largest block: half the patches (dinov2/train/train.py builds its MaskingGenerator with
# max_num_patches=0.5 * N; as written, `0.5 * S // p * S // p`, Python's left-to-right
# floor divisions make that 666 rather than 684 for 518-px crops of /14 patches).
MAX_BLOCK_SHARE = 0.5


def ibot_masks(
    n: int,
    grid: tuple[int, int],
    *,
    probability: float,
    ratio: tuple[float, float],
    min_block: int,
    rng: random.Random,
) -> Tensor:
    """Masks for `n` global crops: [n, gh·gw] bool, True = hidden from the student.

    int(n·probability) crops get a block mask; their ratios are spread evenly over `ratio`
    (one draw from each of that many equal slices, as DINOv2's collate); the rest get none.
    No block covers more than half the crop (`MAX_BLOCK_SHARE`). The order is shuffled so
    masked crops land anywhere in the batch.
    """
    gh, gw = grid
    max_block = int(MAX_BLOCK_SHARE * gh * gw)
    masked = int(n * probability)
    edges = np.linspace(ratio[0], ratio[1], masked + 1)
    masks = [
        block_mask(
            grid,
            max(1, int(gh * gw * rng.uniform(edges[i], edges[i + 1]))),
            rng,
            min_block=min_block,
            max_block=max_block,
        )
        for i in range(masked)
    ]
    masks += [np.zeros((gh, gw), dtype=bool)] * (n - masked)
    rng.shuffle(masks)
    return torch.from_numpy(np.stack(masks).reshape(n, gh * gw))


# ---------------------------------------------------------------------------- losses


def koleo_loss(x: Tensor) -> Tensor:
    """Kozachenko-Leonenko entropy term: x [B, D] -> -mean log(distance to the nearest
    neighbour) of the L2-normalised rows. Lower when the points spread out; 0 for B < 2."""
    if x.shape[0] < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), dim=-1, eps=1e-8)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)  # [B]
    distance = (x - x[nearest] + 1e-8).norm(dim=-1)  # PairwiseDistance's eps
    return -torch.log(distance + 1e-8).mean()


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Teacher targets by Sinkhorn-Knopp (DINOv2's option): logits [n, K] -> probabilities
    [n, K] whose prototypes are used equally across the batch of every rank."""
    scaled = logits.float() / temp
    top = scaled.max() if scaled.numel() else scaled.new_tensor(-math.inf)
    collectives.all_reduce_(top, "max")  # one shift for all ranks: no overflow
    q = torch.exp(scaled - top).T  # [K, n]
    k = q.shape[0]
    total = collectives.all_reduce_(torch.tensor(float(q.shape[1]), device=q.device))
    q /= collectives.all_reduce_(q.sum())
    for _ in range(iterations):
        rows = collectives.all_reduce_(q.sum(dim=1, keepdim=True))
        q /= rows.clamp_min(torch.finfo(q.dtype).tiny)  # each prototype: mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: mass 1/n
        q /= total
    return (q * total).T


# ---------------------------------------------------------------------------- teacher


class EMATeacher(nn.Module):
    """A frozen copy of the student's `encoder` and `head` whose weights are fp32 buffers.

    Same module tree and state_dict keys as the student (so `teacher.encoder` exports and
    reloads as the model's encoder), always in eval mode (no drop-path), never trained.
    """

    def __init__(self, student: DINOv2Model) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(student.encoder)
        self.head = copy.deepcopy(student.head)
        for module in self.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                del module._parameters[name]
                module.register_buffer(name, param.detach().float(), persistent=True)
        self.train(False)

    def train(self, mode: bool = True) -> EMATeacher:
        return super().train(False)

    @torch.no_grad()
    def update(
        self, student: DINOv2Model, momentum: float, weights: WeightReader | None = None
    ) -> None:
        """teacher <- momentum·teacher + (1 - momentum)·student, in fp32, tensor by tensor.

        `weights` reads a student module's trained weights as (name, tensor) pairs: in
        bf16/fp16 training the loop passes DeepSpeed's fp32 master copy, as DINOv2's teacher
        follows the fp32 student (dinov2/train/ssl_meta_arch.py update_teacher, on FSDP's
        fp32 flat parameters); by default the module's own parameters.
        """
        if any(hasattr(p, "ds_id") for p in student.parameters()):
            raise RuntimeError(
                "objective 'dinov2' reads the student's full weights for its EMA "
                "teacher: use train.zero_stage 0, 1 or 2 (not ZeRO-3)"
            )
        mine = dict(self.named_buffers())
        for prefix, module in (("encoder", student.encoder), ("head", student.head)):
            pairs = module.named_parameters() if weights is None else weights(module)
            for name, w in pairs:
                t = mine[f"{prefix}.{name}"]
                t.lerp_(w.detach().to(t.dtype), 1.0 - momentum)


# ---------------------------------------------------------------------------- objective


class DINOv2Objective(nn.Module):
    """batch {"image": [B, C, R, R]} -> {"loss", "dino", "ibot", "koleo", "teacher_temp", ...}."""

    # The loop hands this objective fp32 images: crops and intensity changes keep a 16-bit
    # source's precision; the crops are cast to the student's dtype after.
    input_dtype = torch.float32

    progress: Tensor  # [2] int64: optimizer steps taken, max_steps (saved with checkpoints)
    dino_center: Tensor  # [1, K]
    ibot_center: Tensor  # [1, K]

    def __init__(self, cfg: DINOv2ObjectiveConfig, model: DINOv2Model) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model  # the student; registered first, so its dtype is the loop's
        self.teacher = EMATeacher(model)
        self.global_size, self.local_size = crop_sizes(
            cfg, image_size=model.encoder.image_size, patch_size=model.encoder.patch_size
        )
        k = model.head.prototypes
        self.register_buffer("dino_center", torch.zeros(1, k))
        self.register_buffer("ibot_center", torch.zeros(1, k))
        self.register_buffer("progress", torch.zeros(2, dtype=torch.long))

    @property
    def encoder(self) -> nn.Module:
        """The teacher's backbone: what DINOv2 evaluates and what gets exported."""
        return self.teacher.encoder

    @property
    def student(self) -> DINOv2Model:
        return self.model

    def after_step(self, step: int, max_steps: int, weights: WeightReader | None = None) -> None:
        """After optimizer step `step` (1-based): EMA update with iteration step-1's momentum,
        from the student's weights as `weights` reads them (see `EMATeacher.update`)."""
        m = momentum_at(
            step - 1,
            max_steps,
            start=self.cfg.momentum_teacher,
            end=self.cfg.momentum_teacher_end,
        )
        self.teacher.update(self.model, m, weights)
        self.progress.copy_(torch.tensor([step, max_steps]))

    def teacher_temp(self) -> float:
        step, max_steps = (int(v) for v in self.progress.tolist())
        return teacher_temp_at(step, max_steps, self.cfg)

    # -- pieces ---------------------------------------------------------------------------
    def make_crops(
        self, images: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        """images [B, C, R, R] -> (global [G·B, C, Sg, Sg], local [L·B, C, Sl, Sl] or None).

        R is the crop source's side (data.crop_source_size, else the model's input): crops
        are resized from it, never upsampled from a smaller copy when R is large enough.
        """
        cfg = self.cfg
        b, channels = images.shape[:2]
        unit = cfg.input_mean is not None
        source = self.to_unit(images) if unit else images  # [B, 1, R, R] in [0, 1]

        def crops(blur_prob: list[float], size: int, scale: tuple[float, float]) -> Tensor:
            views = multi_crop(
                source, len(blur_prob), out_size=size, scale=scale, ratio=cfg.crop_ratio,
                hflip_prob=cfg.hflip_prob, generator=generator,
            )  # fmt: skip
            if not unit:
                return views
            per_view = torch.tensor(blur_prob, device=views.device).repeat_interleave(b)
            views = augment_views(views, cfg.augment, blur_prob=per_view, generator=generator)
            return self.from_unit(views, channels)

        first, second, local = cfg.augment.blur_prob
        global_crops = crops([first, second], self.global_size, cfg.global_crop_scale)
        local_crops = None
        if cfg.local_crops:
            local_crops = crops([local] * cfg.local_crops, self.local_size, cfg.local_crop_scale)
        return global_crops, local_crops

    def to_unit(self, images: Tensor) -> Tensor:
        """Normalised [B, C, R, R] (grayscale repeated) -> [B, 1, R, R] fp32 intensities."""
        assert self.cfg.input_mean is not None and self.cfg.input_std is not None
        mean, std = self.cfg.input_mean[0], self.cfg.input_std[0]
        return images[:, :1].float() * std + mean

    def from_unit(self, views: Tensor, channels: int) -> Tensor:
        """[n, 1, S, S] intensities -> [n, channels, S, S] normalised as the batch was."""
        assert self.cfg.input_mean is not None and self.cfg.input_std is not None
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.cfg.input_mean, device=views.device).view(shape)
        std = torch.tensor(self.cfg.input_std, device=views.device).view(shape)
        return (views.expand(-1, channels, -1, -1) - mean) / std

    def make_masks(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """[n, N] bool iBOT masks for n global crops, drawn on the CPU from the step's seed."""
        seed = torch.randint(
            0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu"
        )
        grid = self.global_size // self.model.encoder.patch_size
        masks = ibot_masks(
            n,
            (grid, grid),
            probability=self.cfg.mask_probability,
            ratio=self.cfg.mask_ratio,
            min_block=self.cfg.mask_min_block,
            rng=random.Random(int(seed.item())),
        )
        return masks.to(device, non_blocking=True)

    @torch.no_grad()
    def teacher_targets(self, logits: Tensor, center: Tensor, temp: float) -> Tensor:
        """Teacher logits [n, K] -> target probabilities [n, K]; updates `center` in training."""
        logits = logits.float()
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp)
        probs = torch.softmax((logits - center) / temp, dim=-1)
        if self.training:
            stats = torch.cat([logits.sum(dim=0), logits.new_tensor([logits.shape[0]])])
            stats = collectives.all_reduce_(stats)
            batch_center = stats[:-1] / stats[-1].clamp(min=1.0)
            # no tokens anywhere (e.g. no masks this step): the centre stays where it is
            batch_center = torch.where(stats[-1] > 0, batch_center[None], center)
            center.lerp_(batch_center, 1 - self.cfg.center_momentum)
        return probs

    def _teacher_precision(self, dtype: torch.dtype, device: torch.device):
        # fp32 teacher weights, computed in the student's low precision (or an outer autocast).
        if dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(device.type, dtype=dtype)
        return contextlib.nullcontext()

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self, batch: dict[str, Tensor], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        images = batch["image"]  # [B, C, R, R], normalised
        b, device = images.shape[0], images.device
        dtype = self.model.encoder.cls_token.dtype
        global_crops, local_crops = self.make_crops(images, generator)  # [G·B, ...], [L·B, ...]
        masks = self.make_masks(GLOBAL_CROPS * b, generator, device)  # [G·B, N]
        temp = self.teacher_temp()

        with torch.no_grad(), self._teacher_precision(dtype, device):
            tokens = self.teacher.encoder(global_crops.float())  # [G·B, 1+N, D]
            t_in = torch.cat([tokens[:, 0], tokens[:, 1:][masks]])  # [G·B + M, D]
            t_logits = self.teacher.head(t_in).float()
        t_cls = self.teacher_targets(t_logits[: GLOBAL_CROPS * b], self.dino_center, temp)
        t_patch = self.teacher_targets(t_logits[GLOBAL_CROPS * b :], self.ibot_center, temp)

        s_global = self.model.encoder(global_crops.to(dtype), masks)  # [G·B, 1+N, D]
        s_cls_global = s_global[:, 0]
        s_in = [s_cls_global]
        if local_crops is not None:
            s_in.append(self.model.encoder(local_crops.to(dtype))[:, 0])  # [L·B, D]
        s_in.append(s_global[:, 1:][masks])  # [M, D]
        s_logits = self.model.head(torch.cat(s_in)).float()
        s_logp = F.log_softmax(s_logits / cfg.student_temp, dim=-1)  # [(G+L)·B + M, K]
        s_crops = s_logp[: (GLOBAL_CROPS + cfg.local_crops) * b]
        s_patch = s_logp[(GLOBAL_CROPS + cfg.local_crops) * b :]

        dino = self.dino_loss(s_crops.view(-1, b, s_logp.shape[-1]), t_cls.view(2, b, -1))
        ibot = self.ibot_loss(s_patch, t_patch, masks)
        koleo = sum(koleo_loss(c) for c in s_cls_global.chunk(GLOBAL_CROPS))
        assert isinstance(koleo, Tensor)
        loss = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
        return {
            "loss": loss,
            "dino": dino.detach(),
            "ibot": ibot.detach(),
            "koleo": koleo.detach(),
            "teacher_temp": torch.tensor(temp, device=device),
            "mask_ratio": masks.float().mean(),
        }

    @staticmethod
    def dino_loss(student_logp: Tensor, teacher_probs: Tensor) -> Tensor:
        """student_logp [G+L, B, K] (global crops first), teacher_probs [G, B, K] -> the mean
        cross-entropy over every (teacher crop, other student crop) pair, as DINOv2."""
        g = teacher_probs.shape[0]
        # global student crop i against the teacher's other global crop
        cross_global = -(teacher_probs.flip(0) * student_logp[:g]).sum(-1).mean(-1).sum()
        # every local student crop against every teacher crop
        local = -(teacher_probs.sum(0) * student_logp[g:]).sum(-1).mean(-1).sum()
        pairs = g * (g - 1) + g * (student_logp.shape[0] - g)
        return (cross_global + local) / pairs

    @staticmethod
    def ibot_loss(student_logp: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
        """Masked patches: student_logp, teacher_probs [M, K], masks [n, N] -> cross-entropy
        averaged over each crop's masked patches, summed, divided by all n crops (DINOv2)."""
        per_crop = masks.sum(dim=-1, keepdim=True).clamp(min=1)  # [n, 1]
        weight = (1.0 / per_crop).expand_as(masks)[masks]  # [M]
        ce = -(teacher_probs * student_logp).sum(-1)  # [M]
        return (ce * weight).sum() / masks.shape[0]


@OBJECTIVES.register("dinov2", DINOv2ObjectiveConfig)
def build_dinov2(cfg: DINOv2ObjectiveConfig, *, model: nn.Module) -> DINOv2Objective:
    if not isinstance(model, DINOv2Model):
        raise TypeError(
            f"objective 'dinov2' needs a DINOv2 backbone + head (model 'dinov2_vit'); "
            f"got {type(model).__name__}"
        )
    cfg.validate("objective")
    return DINOv2Objective(cfg, model)
