"""One geometry rule per experiment (`data.fit`), applied to each image whatever its decode
chunk holds; augmentation seeded by (data seed, epoch, row) so an epoch replays exactly."""

from __future__ import annotations

import numpy as np
import pytest

from raydiology.config import AugmentConfig, DataConfig
from raydiology.config_base import ConfigError, from_dict, to_dict
from raydiology.data.pipeline import preprocess_batch

FITS = ["pad", "stretch", "crop"]


def _batch(images: list[np.ndarray], ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """A decode chunk as `column_arrays` hands it over: one pixel blob per row."""
    pixels = np.empty(len(images), dtype=object)
    pixels[:] = [a.tobytes() for a in images]
    return {
        "image_id": np.array(ids or [f"img{i}" for i in range(len(images))], dtype=object),
        "pixels": pixels,
        "height": np.array([a.shape[0] for a in images]),
        "width": np.array([a.shape[1] for a in images]),
        "dtype": np.array([str(a.dtype) for a in images], dtype=object),
    }


def _ramp(h: int, w: int, seed: int) -> np.ndarray:
    """A non-flat image (a ramp plus noise, no zero pixel), so every resize shows."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 220, w)[None, :] + rng.integers(0, 30, (h, w))
    return ramp.astype(np.uint8)


def _prepare(images, data: DataConfig, ids=None, epoch: int = 0) -> dict[str, np.ndarray]:
    return preprocess_batch(_batch(images, ids), data=to_dict(data), label_columns=[], epoch=epoch)


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize(
    "augment", [AugmentConfig(), AugmentConfig(hflip=True, crop_scale=(0.4, 1.0))]
)
def test_an_image_comes_out_the_same_whatever_its_neighbours(fit, augment):
    """The 40x80 image of issue 19 came out 100 % or 56 % non-zero depending on whether its
    chunk held only 40x80 images (stretched) or mixed sizes (padded)."""
    image = _ramp(40, 80, 0)
    data = DataConfig(resolution=32, fit=fit, augment=augment)
    alone = _prepare([image], data, ["x"])["image"][0]
    same_size = _prepare([_ramp(40, 80, 1), image, _ramp(40, 80, 2)], data, ["a", "x", "b"])
    mixed = _prepare([_ramp(64, 64, 3), image, _ramp(90, 30, 4)], data, ["c", "x", "d"])
    assert np.array_equal(same_size["image"][1], alone)
    assert np.array_equal(mixed["image"][1], alone)


@pytest.mark.parametrize(
    ("fit", "non_zero"),
    [
        ("pad", 0.5),  # 40x80 padded to 80x80: zero bands above and below, half the square
        ("stretch", 1.0),
        ("crop", 1.0),  # the centred 40x40
    ],
)
def test_each_fit_has_its_geometry(fit, non_zero):
    image = _ramp(40, 80, 0)
    out = _prepare([image, _ramp(64, 64, 1)], DataConfig(resolution=32, fit=fit))["image"][0, 0]
    assert out.shape == (32, 32)
    assert (out > 0).mean() == pytest.approx(non_zero, abs=0.07)  # the bands' blurred edges
    if fit == "crop":  # the ramp's middle half only: no column as dark as the left edge
        assert out[:, 0].mean() > image[:, 20].mean() - 10
    if fit == "pad":
        assert out[:7].max() == 0 and out[-7:].max() == 0 and out[9:23].min() > 0  # rows 8..24


def test_fit_is_checked():
    with pytest.raises(ConfigError, match=r"data\.fit"):
        from_dict(DataConfig, {"fit": "letterbox"}, "data")


def test_square_images_are_the_same_under_every_fit():
    image = _ramp(48, 48, 0)
    outs = [_prepare([image], DataConfig(resolution=32, fit=f))["image"] for f in FITS]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_real_radiographs_keep_their_geometry_in_any_chunk(hannover_png):
    """Real, non-square chest radiographs alone and beside each other: identical outputs."""
    from PIL import Image

    paths = sorted(hannover_png.glob("*.png"))
    images = [np.asarray(Image.open(p).convert("L")) for p in paths[:12]]
    sizes = {a.shape for a in images}
    assert len(sizes) > 1 and any(h != w for h, w in sizes), "want mixed, non-square sizes"
    data = DataConfig(resolution=64, augment=AugmentConfig(hflip=True))  # default fit: pad
    together = _prepare(images, data)["image"]
    for i, image in enumerate(images):
        assert np.array_equal(_prepare([image], data, [f"img{i}"])["image"][0], together[i])


def test_augmentation_is_seeded_by_epoch_and_row():
    images = [_ramp(48, 64, i) for i in range(8)]
    data = DataConfig(resolution=32, augment=AugmentConfig(hflip=True, crop_scale=(0.3, 1.0)))
    first = _prepare(images, data, epoch=3)["image"]
    # The same epoch replays exactly (a resume); the rows' order in the chunk does not matter.
    again = _prepare(images[::-1], data, [f"img{i}" for i in range(8)][::-1], epoch=3)["image"]
    assert np.array_equal(first, again[::-1])
    # Another epoch draws other crops and flips.
    other = _prepare(images, data, epoch=4)["image"]
    assert sum(not np.array_equal(a, b) for a, b in zip(first, other, strict=True)) >= 6


def test_anatomy_sampling_is_seeded_by_epoch_and_row():
    images = [_ramp(16, 16, i) for i in range(200)]
    batch = _batch(images)
    batch["anatomy"] = np.array(["knee"] * 200, dtype=object)
    data = to_dict(DataConfig(resolution=16, anatomy_weights={"chest": 1.0, "knee": 0.5}))

    def kept(epoch: int) -> set[int]:
        out = preprocess_batch(batch, data=data, label_columns=[], epoch=epoch)
        return set(out["row_key"].tolist())

    assert kept(0) == kept(0) and kept(0) != kept(1)
    assert 70 <= len(kept(0)) <= 130  # about half the knees
