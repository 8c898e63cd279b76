"""Per-view augmentations on the accelerator, with torchvision.transforms.v2's functional ops.

For objectives that cut several views of each image on the device (DINOv2's multi-crop):
XR-0's list, after the crop and the flip, is rotation, auto-contrast, histogram equalisation
and Gaussian blur. Views are [n, 1, S, S] float32 intensities in [0, 1] (a 16-bit source
keeps its precision); each view draws its own parameters from the step's generator, so a
seeded step replays exactly. Auto-contrast and equalisation run batched over the views that
drew them; v2's rotate and gaussian_blur take one angle / sigma a call, so those loop over
the views that drew them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from raydiology.config_base import check


@dataclass(kw_only=True)
class ViewAugment:
    """Probabilities and ranges of the per-view intensity and rotation changes (0 = off)."""

    rotation_prob: float = 0.0
    rotation_degrees: float = 0.0  # angle ~ U(-d, d), bilinear, black outside the image
    autocontrast_prob: float = 0.0
    equalize_prob: float = 0.0
    # Gaussian blur: (first global crop, second global crop, local crops), as DINOv2's
    # DataAugmentationDINO; sigma ~ U(blur_sigma) in output pixels, a blur_kernel-tap kernel
    blur_prob: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 9

    @property
    def changes_intensity(self) -> bool:
        return self.autocontrast_prob > 0 or self.equalize_prob > 0

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        for name in ("rotation_prob", "autocontrast_prob", "equalize_prob"):
            value = getattr(self, name)
            check(0 <= value <= 1, f"{k}{name}", value, "a value in [0, 1]")
        check(all(0 <= p <= 1 for p in self.blur_prob), f"{k}blur_prob", list(self.blur_prob),
              "three values in [0, 1]: first global, second global, local crops")  # fmt: skip
        check(
            0 <= self.rotation_degrees <= 180,
            f"{k}rotation_degrees",
            self.rotation_degrees,
            "0..180",
        )
        lo, hi = self.blur_sigma
        check(0 < lo <= hi, f"{k}blur_sigma", [lo, hi], "0 < min <= max")
        check(
            self.blur_kernel >= 3 and self.blur_kernel % 2 == 1,
            f"{k}blur_kernel",
            self.blur_kernel,
            "an odd size >= 3",
        )


def equalize(views: Tensor) -> Tensor:
    """Histogram equalisation of float [n, 1, H, W] views in [0, 1], each over its own range.

    v2's equalize bins a float image in 256 levels of [0, 1]; a 16-bit radiograph whose
    content spans a narrow window would fall into a few bins and come out as a few grey
    levels. Auto-contrast first spreads each view's own min..max over the 256 bins.
    """
    return TF.equalize(TF.autocontrast(views))


@torch.no_grad()
def augment_views(
    views: Tensor,
    cfg: ViewAugment,
    *,
    blur_prob: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """views [n, 1, H, W] float in [0, 1] -> the same shape, each view rotated, contrasted,
    equalised and blurred with its own draws; `blur_prob` [n] is each view's blur chance."""
    n, device = views.shape[0], views.device
    # One draw of every parameter for every view, then one copy to the host for the loops.
    u = torch.rand(6, n, generator=generator, device=device)
    draws = u.cpu()
    rotate = draws[0] < cfg.rotation_prob
    angles = ((draws[1] * 2 - 1) * cfg.rotation_degrees).tolist()
    contrast = (u[2] < cfg.autocontrast_prob).nonzero()[:, 0]
    equal = (u[3] < cfg.equalize_prob).nonzero()[:, 0]
    blur = draws[4] < blur_prob.cpu()
    lo, hi = cfg.blur_sigma
    sigmas = (lo + (hi - lo) * draws[5]).tolist()

    out = views.clone()
    for i in rotate.nonzero()[:, 0].tolist():
        out[i] = TF.rotate(out[i], angles[i], interpolation=InterpolationMode.BILINEAR, fill=0.0)
    if len(contrast):
        out[contrast] = TF.autocontrast(out[contrast])
    if len(equal):
        out[equal] = equalize(out[equal])
    k = cfg.blur_kernel
    for i in blur.nonzero()[:, 0].tolist():
        out[i] = TF.gaussian_blur(out[i], kernel_size=[k, k], sigma=[sigmas[i], sigmas[i]])
    return out
