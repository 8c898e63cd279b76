"""Frozen-encoder segmentation: a decoder trained on patch features, scored by Dice.

XR-0's protocol (arXiv 2509.12146, segmentation evaluation, as quoted in issue 17): the
backbone is frozen; a linear decoder (one 1x1 conv on the last layer's patch features, then
upsampling to the image) or a UPerNet decoder on 4 intermediate layers; Dice loss and Dice
metric per class; batch 8; lr 1e-4 halved when the validation Dice plateaus; early stopping;
a fixed iteration budget; augmentations applied to image and mask together: random affine
(p 0.5), elastic (p 0.1), gamma (p 0.1), Gaussian noise (p 0.1).

Choices the protocol leaves open, fixed here (no source: say so when comparing):
- classes are independent (a sigmoid per class): anatomy overlaps (clavicles over lungs,
  a lesion inside a lung); the Dice loss is the soft Dice per class averaged over the
  classes annotated in the batch (V-Net's soft Dice, Milletari et al. 2016, squared terms
  left out as in MONAI's default `squared_pred=False`);
- the metric is the Dice of the thresholded (0.5) prediction per image and class
  (torchmetrics' `dice_score`), averaged over the test images whose truth for that class
  is non-empty (MONAI DiceMetric's `ignore_empty=True` convention: an empty truth has no
  defined Dice);
- the ranges of the augmentations (affine ±10°, ±5 % shift, 0.9-1.1 scale; elastic
  alpha 20 px-equivalent, sigma 5; gamma 0.7-1.5; noise std 0.02) are not given by XR-0;
- optimiser Adam; validation every `eval_every` steps, plateau patience and early stop in
  validations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydiology.config_base import check
from raydiology.evaluation.dense import BestSoFar, DenseSplit, FrozenDenseEncoder
from raydiology.evaluation.features import Progress

Decoder = Literal["linear", "uper"]
DECODERS: tuple[str, ...] = ("linear", "uper")


@dataclass(frozen=True, kw_only=True)
class SegmentConfig:
    """Decoder training; the defaults follow XR-0 where it gives a value (see module doc)."""

    decoder: Decoder = "linear"
    batch_size: int = 8  # XR-0
    lr: float = 1e-4  # XR-0 (Adam)
    lr_factor: float = 0.5  # XR-0: halved on a validation-Dice plateau
    lr_patience: int = 2  # validations without improvement before halving (not in XR-0)
    patience: int = 5  # early stop after this many validations without improvement (not in XR-0)
    max_steps: int = 2000  # the fixed iteration budget (XR-0 gives none: chosen here)
    eval_every: int = 100  # steps between validations
    augment: bool = True
    uper_channels: int = 128  # UPerNet's width (mmseg uses 512 for ViT-B; smaller here)
    seed: int = 0

    def validate(self, key: str = "segment") -> None:
        check(self.decoder in DECODERS, f"{key}.decoder", self.decoder, "linear or uper")
        for name in ("batch_size", "max_steps", "eval_every", "uper_channels"):
            value = getattr(self, name)
            check(value >= 1, f"{key}.{name}", value, "at least 1")
        check(self.lr > 0, f"{key}.lr", self.lr, "a positive learning rate")
        check(0 < self.lr_factor < 1, f"{key}.lr_factor", self.lr_factor, "0 < factor < 1")
        check(self.patience >= 1, f"{key}.patience", self.patience, "at least 1")


# -- decoders -----------------------------------------------------------------------------


class LinearDecoder(nn.Module):
    """XR-0's linear decoder: a 1x1 conv on the last layer's patch features [B, D, gh, gw]
    -> logits [B, K, gh, gw], upsampled bilinearly to the image by `upsample_logits`. A
    BatchNorm first, as DINOv2's linear segmentation head (dinov2/eval/segmentation
    `BNHead`), since frozen features are not scaled for a fresh linear map."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, classes, kernel_size=1)

    def forward(self, feats: dict[str, Any]) -> Tensor:
        return self.conv(self.norm(feats["last"]))


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class UPerDecoder(nn.Module):
    """UPerNet (Xiao et al. 2018, "Unified Perceptual Parsing"): a pyramid pooling module on
    the coarsest level and an FPN over four levels, all levels fused at the finest.

    A plain ViT gives four maps at one stride (16); they are first rescaled to strides 4, 8,
    16, 32 (x4 and x2 transposed convs, identity, 2x2 max pool), as BEiT and ViT-Adapter do
    before UPerNet. A `pyramid` backbone (a ResNet's stages, `dims` their channels) is
    already at those strides. PPM bin sizes 1, 2, 3, 6 are PSPNet's (Zhao et al. 2017).
    `[B, D, gh, gw] x 4 -> logits [B, K, 4 gh, 4 gw]` (a pyramid: at its finest level).
    """

    def __init__(
        self, dims: int | list[int], classes: int, channels: int = 128, pyramid: bool = False
    ) -> None:
        super().__init__()
        d = [dims] * 4 if isinstance(dims, int) else list(dims)
        rescale: list[nn.Module] = [nn.Identity()] * 4
        if not pyramid:
            rescale = [
                nn.Sequential(
                    nn.ConvTranspose2d(d[0], d[0], 2, stride=2),
                    nn.BatchNorm2d(d[0]),
                    nn.GELU(),
                    nn.ConvTranspose2d(d[0], d[0], 2, stride=2),
                ),
                nn.ConvTranspose2d(d[1], d[1], 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        self.rescale = nn.ModuleList(rescale)
        self.bins = (1, 2, 3, 6)
        self.ppm = nn.ModuleList(_conv_bn_relu(d[3], channels, 1) for _ in self.bins)
        self.bottleneck = _conv_bn_relu(d[3] + len(self.bins) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv_bn_relu(d[i], channels, 1) for i in range(3))
        self.fpn = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = _conv_bn_relu(4 * channels, channels, 3)
        self.classify = nn.Conv2d(channels, classes, 1)

    def _ppm(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(conv(F.adaptive_avg_pool2d(x, b)), size=size, mode="bilinear")
            for b, conv in zip(self.bins, self.ppm, strict=True)
        ]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, feats: dict[str, Any]) -> Tensor:
        levels = [r(x) for r, x in zip(self.rescale, feats["layers"], strict=True)]
        tops = [lat(x) for lat, x in zip(self.lateral, levels[:3], strict=True)]
        tops.append(self._ppm(levels[3]))
        for i in (2, 1, 0):  # top-down: add the upsampled coarser level
            tops[i] = tops[i] + F.interpolate(tops[i + 1], size=tops[i].shape[-2:], mode="bilinear")
        outs = [self.fpn[i](tops[i]) for i in range(3)] + [tops[3]]
        size = outs[0].shape[-2:]
        outs = [outs[0], *(F.interpolate(o, size=size, mode="bilinear") for o in outs[1:])]
        return self.classify(self.fuse(torch.cat(outs, dim=1)))


def build_decoder(cfg: SegmentConfig, encoder: FrozenDenseEncoder, classes: int) -> nn.Module:
    if cfg.decoder == "linear":
        return LinearDecoder(encoder.embed_dim, classes)
    return UPerDecoder(encoder.layer_dims, classes, cfg.uper_channels, pyramid=encoder.pyramid)


def upsample_logits(logits: Tensor, size: int) -> Tensor:
    """Decoder logits [B, K, h, w] -> [B, K, size, size] (bilinear: XR-0's upsampling)."""
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


class FeatureBank:
    """A split's frozen features, computed once: without augmentation every step would feed
    the decoder the very same features again, so the encoder runs once per image, not once
    per step (the frozen encoder is most of a step's cost)."""

    def __init__(
        self, encoder: FrozenDenseEncoder, split: DenseSplit, device: str | torch.device
    ) -> None:
        parts = [encoder(_model_input(split.images[rows], encoder, device))
                 for rows in _batches(split, 32)]  # fmt: skip
        self.last = torch.cat([p["last"] for p in parts]) if parts else None
        self.layers = [torch.cat([p["layers"][i] for p in parts]) for i in
                       range(len(encoder.layer_ids))] if parts else []  # fmt: skip

    def __getitem__(self, rows: Tensor | slice) -> dict[str, Any]:
        assert self.last is not None
        return {"last": self.last[rows], "layers": [x[rows] for x in self.layers]}


# -- loss and metric ----------------------------------------------------------------------


def dice_loss(logits: Tensor, masks: Tensor, known: Tensor, eps: float = 1e-5) -> Tensor:
    """1 - soft Dice per (image, class), averaged over the annotated pairs.
    logits [B, K, H, W], masks [B, K, H, W] 0/1, known [B, K] bool."""
    prob = torch.sigmoid(logits.float())
    target = masks.float()
    inter = (prob * target).sum(dim=(2, 3))
    total = prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3))
    dice = (2 * inter + eps) / (total + eps)
    weight = known.float()
    return ((1 - dice) * weight).sum() / weight.sum().clamp(min=1)


def dice_scores(pred: Tensor, masks: Tensor) -> Tensor:
    """Hard Dice per (image, class): pred, masks [B, K, H, W] bool -> [B, K]; NaN where the
    truth is empty (no defined Dice; left out of means). torchmetrics computes the Dice of
    each (image, class) (`average="none"`, samplewise, every class kept: the classes are
    independent sigmoids, none is background); it gives 0, not NaN, for a non-empty
    prediction over an empty truth, hence the mask."""
    from torchmetrics.functional.segmentation import dice_score

    pred, masks = pred.bool(), masks.bool()
    if pred.shape[0] == 0:
        return torch.zeros(pred.shape[:2], dtype=torch.float64)
    dice = dice_score(  # uint8 in: 1 byte a pixel, as the bool masks (sums come out int64)
        pred.to(torch.uint8),
        masks.to(torch.uint8),
        num_classes=masks.shape[1],
        include_background=True,
        average="none",
        input_format="one-hot",
        aggregation_level="samplewise",
    ).double()
    return torch.where(masks.sum(dim=(2, 3)) > 0, dice, torch.nan)


def class_dice(pred: Tensor, masks: Tensor, known: Tensor) -> np.ndarray:
    """Mean Dice per class [K] over the images whose truth for the class is annotated
    (`known` [B, K]) and non-empty; NaN for a class with no such image."""
    scores = torch.where(known, dice_scores(pred, masks), torch.nan).numpy()
    with np.errstate(all="ignore"):
        return np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in scores.T])


# -- augmentation -------------------------------------------------------------------------


class JointAugment:
    """XR-0's augmentations, one image and its masks at a time: geometric ones (affine,
    elastic) through torchvision.transforms.v2, which moves a `tv_tensors.Mask` with the same
    parameters (nearest-neighbour), intensity ones (gamma, noise) on the image only."""

    def __init__(self, resolution: int) -> None:
        from torchvision.transforms import v2

        self.geometric = v2.Compose(
            [
                v2.RandomApply(
                    [v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1))],
                    p=0.5,
                ),
                # alpha in pixels of a 256-px image, scaled with the resolution
                v2.RandomApply(
                    [v2.ElasticTransform(alpha=20.0 * resolution / 256, sigma=5.0)], p=0.1
                ),
            ]
        )

    def __call__(self, image: Tensor, masks: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """image [1, R, R] float in [0, 1], masks [K, R, R] uint8 -> the same, augmented."""
        from torchvision import tv_tensors

        image, mask = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(masks))
        image = image.as_subclass(Tensor)
        if torch.rand((), generator=gen) < 0.1:
            gamma = 0.7 + 0.8 * float(torch.rand((), generator=gen))
            image = image.clamp(0, 1) ** gamma
        if torch.rand((), generator=gen) < 0.1:
            image = image + 0.02 * torch.randn(image.shape, generator=gen)
        return image.clamp(0, 1), mask.as_subclass(Tensor)


# -- training -----------------------------------------------------------------------------


def _model_input(images: Tensor, encoder: FrozenDenseEncoder, device: str | torch.device) -> Tensor:
    from raydiology.data.pipeline import to_model_input

    return to_model_input(images.to(device), encoder.data, dtype=torch.float32)


def _batches(split: DenseSplit, batch_size: int):
    for start in range(0, len(split), batch_size):
        yield slice(start, start + batch_size)


@torch.no_grad()
def predict(
    encoder: FrozenDenseEncoder,
    decoder: nn.Module,
    split: DenseSplit,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    bank: FeatureBank | None = None,
) -> Tensor:
    """Binary predictions [N, K, R, R] (sigmoid >= 0.5); `bank`: the split's features."""
    decoder.eval()
    size = split.images.shape[-1]
    out = []
    for rows in _batches(split, batch_size):
        if bank is not None:
            feats = bank[rows]
        else:
            feats = encoder(_model_input(split.images[rows], encoder, device))
        out.append(upsample_logits(decoder(feats), size).cpu() >= 0)
    return torch.cat(out) if out else torch.zeros(split.masks.shape, dtype=torch.bool)


def evaluate_dice(
    encoder: FrozenDenseEncoder,
    decoder: nn.Module,
    split: DenseSplit,
    *,
    device: str | torch.device = "cpu",
    bank: FeatureBank | None = None,
) -> np.ndarray:
    """Mean Dice per class [K] over images with a non-empty, annotated truth (NaN: none)."""
    pred = predict(encoder, decoder, split, device=device, bank=bank)
    return class_dice(pred, split.masks, split.known)


def _quantise(images01: Tensor, dtype: torch.dtype) -> Tensor:
    top = 255.0 if dtype == torch.uint8 else 65535.0
    return images01.mul(top).round_().clamp_(0, top).to(dtype)


def train_decoder(
    encoder: FrozenDenseEncoder,
    splits: dict[str, DenseSplit],
    cfg: SegmentConfig,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a decoder on the frozen encoder's features (train split), validating by mean
    Dice on the val split; returns the best decoder (by val Dice) and the training log."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, val = splits["train"], splits["val"]
    if len(train) == 0:
        raise ValueError("no annotated images in the train split")
    classes = train.masks.shape[1]
    decoder = build_decoder(cfg, encoder, classes).to(device)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience
    )
    size = train.images.shape[-1]
    augment = JointAugment(size) if cfg.augment else None
    banks = None
    if augment is None:
        banks = {k: FeatureBank(encoder, splits[k], device) for k in ("train", "val")}
    scale = 255.0 if train.images.dtype == torch.uint8 else 65535.0
    kept, history = BestSoFar(cfg.patience), []
    step = 0
    with Progress(enabled=progress, description="segmentation head", total=cfg.max_steps) as bar:
        for step in range(1, cfg.max_steps + 1):
            bar.advance()
            decoder.train()
            rows = torch.randint(len(train), (cfg.batch_size,), generator=gen)
            images, masks = train.images[rows], train.masks[rows]
            if augment is not None:
                pairs = [
                    augment(i.float() / scale, m, gen) for i, m in zip(images, masks, strict=True)
                ]
                images = _quantise(torch.stack([p[0] for p in pairs]), train.images.dtype)
                masks = torch.stack([p[1] for p in pairs])
                feats = encoder(_model_input(images, encoder, device))
            else:
                assert banks is not None
                feats = banks["train"][rows]
            logits = upsample_logits(decoder(feats), size)
            loss = dice_loss(logits, masks.to(device), train.known[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % cfg.eval_every and step != cfg.max_steps:
                continue
            which = "val" if len(val) else "train"
            bank = banks[which] if banks is not None else None
            per_class = evaluate_dice(encoder, decoder, splits[which], device=device, bank=bank)
            score = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else 0.0
            history.append({"step": step, "loss": loss.item(), "val_dice": score,
                            "lr": opt.param_groups[0]["lr"]})  # fmt: skip
            plateau.step(score)
            if kept.update(score, decoder):
                break
    kept.restore(decoder)
    decoder.eval()
    return decoder, {"steps": step, "best_val_dice": kept.score, "history": history}


def segment_encoder(
    encoder: FrozenDenseEncoder,
    splits: dict[str, DenseSplit],
    classes: list[str],
    cfg: SegmentConfig,
    *,
    name: str,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[dict[str, Any], nn.Module]:
    """Train a decoder and score it on the test split: the result row and the decoder."""
    decoder, log = train_decoder(encoder, splits, cfg, device=device, progress=progress)
    test = splits["test"]
    per_class = evaluate_dice(encoder, decoder, test, device=device)
    dice = {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, per_class, strict=True)}
    known = [v for v in dice.values() if v is not None]
    result = {
        "encoder": name,
        "decoder": cfg.decoder,
        "classes": classes,
        "dice": dice,
        "dice_mean": float(np.mean(known)) if known else None,
        "n": {k: len(v) for k, v in splits.items()},
        "steps": log["steps"],
        "best_val_dice": log["best_val_dice"],
        "history": log["history"],
        "layers": encoder.layer_ids,
        "config": asdict(cfg),
    }
    return result, decoder


def save_overlays(
    rows: list[tuple[str, FrozenDenseEncoder, nn.Module]],
    split: DenseSplit,
    classes: list[str],
    path: Any,
    *,
    images: int = 3,
    device: str | torch.device = "cpu",
    caption: str | None = None,
) -> None:
    """A grid per test image: the image, the truth overlay, then each encoder's prediction
    overlay (one colour per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(images, len(split))
    if n == 0:
        return
    subset = DenseSplit(images=split.images[:n], masks=split.masks[:n], known=split.known[:n],
                        image_ids=split.image_ids[:n])  # fmt: skip
    preds = [predict(enc, dec, subset, device=device) for _, enc, dec in rows]
    colours = plt.get_cmap("tab10")
    scale = 255.0 if split.images.dtype == torch.uint8 else 65535.0
    cols = 2 + len(rows)
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.4 * n), squeeze=False)

    def overlay(ax: Any, image: np.ndarray, masks: np.ndarray, title: str) -> None:
        rgb = np.repeat(image[..., None], 3, axis=-1)
        for k in range(masks.shape[0]):
            colour = np.array(colours(k % 10)[:3])
            on = masks[k].astype(bool)
            rgb[on] = 0.5 * rgb[on] + 0.5 * colour
        ax.imshow(rgb)
        ax.set_title(title, fontsize=8)

    for i in range(n):
        image = split.images[i, 0].float().numpy() / scale
        axes[i, 0].imshow(image, cmap="gray")
        axes[i, 0].set_title("image", fontsize=8)
        overlay(axes[i, 1], image, subset.masks[i].numpy(), "truth")
        for j, (name, _, _) in enumerate(rows):
            overlay(axes[i, 2 + j], image, preds[j][i].numpy(), name)
    for ax in axes.flat:
        ax.axis("off")
    legend = ", ".join(f"{c} = {matplotlib.colors.to_hex(colours(k % 10))}"
                       for k, c in enumerate(classes))  # fmt: skip
    fig.suptitle(legend + (f"\n{caption}" if caption else ""), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
