"""XR-0's views: DINOv2 crops cut from a larger copy of the stored image than the model's
input (`data.crop_source_size`), and the per-crop augmentations of `raydiology.data.views`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from raydiology.config import DataConfig, load_experiment
from raydiology.config_base import ConfigError, from_dict
from raydiology.data.pipeline import preprocess_batch, to_model_input
from raydiology.data.views import ViewAugment, augment_views, equalize
from raydiology.models.dinov2 import DINOv2Config, build_dinov2_vit
from raydiology.objectives.dino import DINOv2ObjectiveConfig, build_dinov2

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def stored_batch(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """One uint16 image as the corpus stores it (the columns preprocess_batch reads)."""
    h, w = pixels.shape
    return {
        "image_id": np.array(["a"], dtype=object),
        "pixels": np.array([pixels.astype("<u2").tobytes()], dtype=object),
        "height": np.array([h]),
        "width": np.array([w]),
        "dtype": np.array(["uint16"], dtype=object),
    }


def stripes(side: int, period: int) -> np.ndarray:
    """Vertical stripes, 16-bit, a narrow window (0.30 / 0.40 of full scale)."""
    x = np.arange(side)
    row = np.where((x // (period // 2)) % 2 == 0, 0.30, 0.40) * 65535
    return np.tile(row, (side, 1)).round().astype(np.uint16)


def stripe_contrast(crops: torch.Tensor) -> float:
    """Mean absolute difference between neighbouring columns two pixels apart."""
    x = crops[:, 0]
    return float((x[..., 2:] - x[..., :-2]).abs().mean())


def global_crops(crop_source_size: int | None, pixels: np.ndarray) -> torch.Tensor:
    data = from_dict(
        DataConfig,
        {"resolution": 64, "crop_source_size": crop_source_size, "mean": [0.5], "std": [0.25]},
        "data",
    )
    batch = preprocess_batch(stored_batch(pixels), data=data, label_columns=[], out_dtype="uint16")
    images = to_model_input(torch.from_numpy(batch["image"]), data, dtype=torch.float32)
    torch.manual_seed(0)
    model = build_dinov2_vit(DINOv2Config(flavor="tiny"), image_size=64, in_chans=1)
    objective = build_dinov2(
        DINOv2ObjectiveConfig(
            global_crop_size=64, global_crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0),
            local_crops=0, hflip_prob=0.0, input_mean=(0.5,), input_std=(0.25,),
        ),
        model=model,
    )  # fmt: skip
    crops, local = objective.make_crops(images, torch.Generator().manual_seed(0))
    assert local is None and crops.shape == (2, 1, 64, 64)
    return crops * 0.25 + 0.5  # back to intensities


def test_global_crops_keep_detail_the_model_input_has_lost() -> None:
    """Stripes of period 6 px in a 256-px stored image: a global crop of a quarter of the
    area (128 px -> 64) keeps them at period 3; cut from the 64-px model input instead
    (resized by 4, below the stripes' frequency, then upsampled by 2) they are gone."""
    pixels = stripes(256, 6)
    from_source = global_crops(256, pixels)
    from_input = global_crops(None, pixels)
    assert stripe_contrast(from_source) > 0.04  # of the 0.1 step (measured 0.057)
    assert stripe_contrast(from_input) < 0.015  # (measured 0.009)


def test_the_batch_carries_the_crop_source_at_a_bounded_size() -> None:
    """Whatever the stored size, a sample is S x S integers: 2·S² bytes for a 16-bit corpus."""
    side = 96
    data = from_dict(DataConfig, {"resolution": 32, "crop_source_size": side}, "data")
    for shape in [(300, 200), (64, 64), (96, 96)]:  # down-scaled, up-scaled, as stored
        pixels = np.random.default_rng(0).integers(0, 65535, shape, dtype=np.uint16)
        out = preprocess_batch(
            stored_batch(pixels), data=data, label_columns=[], out_dtype="uint16"
        )
        assert out["image"].shape == (1, 1, side, side)
        assert out["image"].nbytes == 2 * side * side
    images = to_model_input(torch.from_numpy(out["image"]), data, dtype=torch.float32)
    assert images.shape == (1, 1, side, side)


def test_xr0_crop_source_never_upsamples_a_global_crop_and_is_checked() -> None:
    exp = load_experiment(EXPERIMENTS / "xr0_dinov2.yaml")
    cfg, side = exp.objective.config, exp.data.crop_source_size
    assert side is not None and exp.data.batch_side == side
    smallest = side * math.sqrt(cfg.global_crop_scale[0] * cfg.crop_ratio[0])
    assert smallest >= cfg.global_crop_size  # the smallest global crop is down-scaled
    assert 2 * side * side <= 1.5e6  # bytes a 16-bit sample takes through Ray Data
    assert cfg.input_mean == exp.data.mean and cfg.input_std == exp.data.std
    with pytest.raises(ConfigError) as err:  # smaller than the model input
        load_experiment(EXPERIMENTS / "xr0_dinov2.yaml", overrides=["data.crop_source_size=256"])
    assert err.value.key == "data.crop_source_size"
    with pytest.raises(ConfigError) as err:  # an objective that does not cut its own views
        load_experiment(EXPERIMENTS / "hd_mae_cam.yaml", overrides=["data.crop_source_size=2048"])
    assert err.value.key == "data.crop_source_size"
    with pytest.raises(ConfigError) as err:  # un-normalising with other statistics
        load_experiment(EXPERIMENTS / "xr0_dinov2.yaml", overrides=["data.std=[0.5, 0.5, 0.5]"])
    assert err.value.key == "objective.input_std"
    with pytest.raises(ConfigError) as err:  # augmentations work on intensities
        from_dict(DINOv2ObjectiveConfig, {"augment": {"equalize_prob": 0.5}}, "objective")
    assert err.value.key == "objective.input_mean"


# ---------------------------------------------------------------------------- augmentations


def sixteen_bit_window(n: int = 4, side: int = 32) -> torch.Tensor:
    """[n, 1, side, side] 16-bit-derived intensities in a narrow window [0.30, 0.31], skewed."""
    g = torch.Generator().manual_seed(1)
    levels = (0.30 + 0.01 * torch.rand(n, 1, side, side, generator=g) ** 2) * 65535
    return levels.round() / 65535


def run(views: torch.Tensor, seed: int = 0, blur: float = 0.0, **cfg) -> torch.Tensor:
    blur_prob = torch.full((views.shape[0],), blur)
    return augment_views(
        views,
        ViewAugment(**cfg),
        blur_prob=blur_prob,
        generator=torch.Generator().manual_seed(seed),
    )


def test_off_leaves_views_unchanged() -> None:
    views = sixteen_bit_window()
    assert torch.equal(run(views), views)


def test_autocontrast_stretches_a_16_bit_window_to_full_range_keeping_order() -> None:
    views = sixteen_bit_window()
    out = run(views, autocontrast_prob=1.0)
    flat_in, flat_out = views.flatten(1), out.flatten(1)
    assert torch.allclose(flat_out.amin(1), torch.zeros(4)) and torch.allclose(
        flat_out.amax(1), torch.ones(4)
    )
    # an affine stretch: the 16-bit levels stay distinct and in order
    for a, b in zip(flat_in, flat_out, strict=True):
        assert torch.equal(torch.argsort(a, stable=True), torch.argsort(b, stable=True))
        assert len(torch.unique(b)) == len(torch.unique(a)) > 200


def test_equalisation_flattens_the_histogram_of_a_16_bit_window() -> None:
    # 128 px: v2 follows PIL's integer LUT step (pixels / 255, floored), coarse on tiny images
    views = sixteen_bit_window(side=128)
    out = run(views, equalize_prob=1.0)
    assert len(torch.unique(out[0])) > 150  # (measured 188 of 256)
    # equalised: quantiles of the output follow the uniform distribution
    q = torch.tensor([0.25, 0.5, 0.75, 0.9])
    assert torch.allclose(torch.quantile(out[0].flatten(), q), q, atol=0.03)
    # v2's equalize alone bins [0, 1] in 256 levels: the window is a few grey levels
    assert len(torch.unique(TF.equalize(views[:1]))) <= 4
    assert torch.equal(equalize(views), out)


def test_rotation_turns_a_bar_and_keeps_a_disc() -> None:
    side = 33
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    bar = ((y - 16).abs() <= 1) & ((x - 16).abs() <= 12)
    disc = (y - 16) ** 2 + (x - 16) ** 2 <= 100
    views = torch.stack([bar, disc]).float()[:, None]
    out = run(views, rotation_prob=1.0, rotation_degrees=60.0)
    turned = (out[0] - views[0]).abs().sum() / views[0].sum()
    assert turned > 0.3  # the bar moved
    assert (out[1] - views[1]).abs().sum() / views[1].sum() < 0.15  # the disc did not
    assert out[0].sum() == pytest.approx(float(views[0].sum()), rel=0.1)  # nothing lost


def test_blur_follows_each_views_probability_and_smooths() -> None:
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2).float()
    views = checker.expand(4, 1, 32, 32).clone()
    blur_prob = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = augment_views(
        views,
        ViewAugment(blur_prob=(1.0, 1.0, 1.0), blur_sigma=(1.0, 2.0)),
        blur_prob=blur_prob,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(out[1], views[1]) and torch.equal(out[3], views[3])
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert out[inner][[0, 2]].std() < 0.1 * views[inner][[0, 2]].std()


def test_views_replay_under_a_seed_and_change_with_it() -> None:
    views = sixteen_bit_window(8)
    cfg = {"rotation_prob": 0.5, "rotation_degrees": 10.0, "autocontrast_prob": 0.5,
           "equalize_prob": 0.5, "blur": 0.5}  # fmt: skip
    first, again, other = run(views, 3, **cfg), run(views, 3, **cfg), run(views, 4, **cfg)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    some = run(views, 3, autocontrast_prob=0.5)
    changed = [not torch.equal(a, b) for a, b in zip(some, views, strict=True)]
    assert any(changed) and not all(changed)  # probabilities, not always-on


def test_objective_augments_its_crops_under_the_steps_seed() -> None:
    """The xr0 recipe's crops: normalised as the data, in [0, 1] once un-normalised, and the
    same for the same step seed."""
    exp = load_experiment(
        EXPERIMENTS / "xr0_dinov2.yaml",
        overrides=["model.flavor=tiny", "data.resolution=64", "data.crop_source_size=96"],
    )
    torch.manual_seed(0)
    model = build_dinov2_vit(DINOv2Config(flavor="tiny"), image_size=64, in_chans=3)
    objective = build_dinov2(exp.objective.config, model=model)
    pixels = torch.from_numpy(
        np.random.default_rng(0)
        .integers(0, 65535, (2, 1, 96, 96), dtype=np.uint16)
        .astype(np.int32)
    ).to(torch.uint16)
    images = to_model_input(pixels, exp.data, dtype=torch.float32)
    g, loc = objective.make_crops(images, torch.Generator().manual_seed(5))
    g2, loc2 = objective.make_crops(images, torch.Generator().manual_seed(5))
    assert loc is not None and loc2 is not None
    assert torch.equal(g, g2) and torch.equal(loc, loc2)
    assert g.shape == (4, 3, 64, 64) and loc.shape == (16, 3, 32, 32)
    mean = torch.tensor(exp.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(exp.data.std).view(1, 3, 1, 1)
    unit = g * std + mean
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    assert torch.allclose(unit[:, 0], unit[:, 2], atol=1e-5)  # grayscale in every channel
