"""One intensity rule for every source (issue 19), on real radiographs.

The Hannover chest radiographs (8-bit PNGs) are widened to 12 bits and written as 16-bit
PNGs and as DICOM files by pydicom itself, so that each test compares the same pixels
arriving through different containers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from raydiology.data.dicom import load_dicom  # noqa: E402
from raydiology.data.images import fit_square, load_image, to_bit_depth  # noqa: E402


@pytest.fixture
def radiograph(hannover_png: Path) -> np.ndarray:
    """A real chest radiograph, 8-bit, about 640 px wide."""
    return np.asarray(Image.open(sorted(hannover_png.glob("*.png"))[0]).convert("L"))


def _twelve_bit(eight: np.ndarray) -> np.ndarray:
    return ((eight.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16)


def _png16(path: Path, pixels: np.ndarray, sbit: int | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))  # significant bits of the gray sample
    Image.fromarray(pixels).save(path, pnginfo=info)
    assert Image.open(path).mode.startswith("I;16")
    return path


def _dicom(
    path: Path, pixels: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2", **tags
) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_12_bit_png_and_dicom_store_the_same_image(radiograph: np.ndarray, tmp_path: Path):
    twelve = _twelve_bit(radiograph)
    png = load_image(_png16(tmp_path / "a.png", twelve))
    dicom = load_dicom(_dicom(tmp_path / "a.dcm", twelve, bits_stored=12)).pixels
    assert png.dtype == dicom.dtype == np.uint16
    assert np.array_equal(png, dicom)
    # Scaled by the 12 bits used: the whole 16-bit range, not 6 % of it, and no per-image
    # stretch (the image's own maximum maps to its share of 4095).
    assert png.max() == round(int(twelve.max()) * 65535 / 4095)
    for depth in (8, 16):
        a = fit_square(to_bit_depth(png, depth), 256, "pad")
        b = fit_square(to_bit_depth(dicom, depth), 256, "pad")
        assert np.array_equal(a, b)
    # Back at 8 bits the picture is the original one (12-bit widening rounds by <= 1 level).
    assert np.abs(to_bit_depth(png, 8).astype(int) - radiograph.astype(int)).max() <= 1


def test_ingest_stores_png_and_dicom_alike(radiograph: np.ndarray, tmp_path: Path):
    """End to end: the two files decode to identical pixels, so the ingest keeps one as an
    exact duplicate (near-duplicate matching is off, so nothing looser can join them)."""
    from raydiology.data.ingest import ingest_images

    src = tmp_path / "src"
    src.mkdir()
    twelve = _twelve_bit(radiograph)
    _png16(src / "a.png", twelve)
    _dicom(src / "b.dcm", twelve, bits_stored=12)
    summary = ingest_images(
        [src],
        tmp_path / "c",
        size=128,
        bit_depth=16,
        salt="s",
        near_duplicate_distance=None,
        parallel=False,
        progress=False,
    )
    assert (summary.found, summary.ingested, summary.duplicates) == (2, 1, 1)


def test_8_bit_png_and_8_bit_dicom_store_the_same_image(radiograph: np.ndarray, tmp_path: Path):
    path = tmp_path / "a.png"
    Image.fromarray(radiograph).save(path)
    png = load_image(path)
    dicom = load_dicom(_dicom(tmp_path / "a.dcm", radiograph, bits_stored=8)).pixels
    assert png.dtype == np.uint8 and np.array_equal(png, radiograph)
    assert np.array_equal(to_bit_depth(dicom, 8), png)
    assert np.array_equal(to_bit_depth(png, 16), dicom)


def test_png_sbit_chunk_sets_the_bits_like_bits_stored(radiograph: np.ndarray, tmp_path: Path):
    """A 14-bit detector image that happens to stay below 4096: sBIT (PNG) and BitsStored
    (DICOM) both say 14 bits; without sBIT the PNG is read as the 12 bits it fits in."""
    pixels = _twelve_bit(radiograph)
    declared = load_image(_png16(tmp_path / "sbit.png", pixels, sbit=14))
    dicom = load_dicom(_dicom(tmp_path / "a.dcm", pixels, bits_stored=14)).pixels
    inferred = load_image(_png16(tmp_path / "plain.png", pixels))
    assert np.array_equal(declared, dicom)
    assert declared.max() == round(int(pixels.max()) * 65535 / 16383)
    assert inferred.max() == round(int(pixels.max()) * 65535 / 4095)


def test_to_bit_depth_is_one_fixed_factor(radiograph: np.ndarray):
    assert np.array_equal(to_bit_depth(to_bit_depth(radiograph, 16), 8), radiograph)
    dim = (radiograph.astype(np.uint16) // 16) * 257  # a dim 16-bit image stays dim at 8 bits
    assert np.array_equal(to_bit_depth(dim, 8), radiograph // 16)


def test_padding_pixels_are_black_and_left_out_of_the_clip(radiograph: np.ndarray, tmp_path):
    """PixelPaddingValue marks the area outside the collimated image: it is stored black even
    in MONOCHROME1 (where its value would be the brightest), and the percentile clip is
    computed over the image alone."""
    # MONOCHROME1 storage of the picture, with stored 0 left free for padding
    inner = np.maximum(4095 - _twelve_bit(radiograph), 1).astype(np.uint16)
    h, w = inner.shape
    padded = np.zeros((h + 200, w + 200), dtype=np.uint16)  # about half the pixels padding
    padded[100:-100, 100:-100] = inner
    border = padded == 0
    for clip in (None, 2.0):
        alone = load_dicom(
            _dicom(tmp_path / "inner.dcm", inner, 12, "MONOCHROME1"), clip_percentile=clip
        ).pixels
        with_padding = load_dicom(
            _dicom(tmp_path / "p.dcm", padded, 12, "MONOCHROME1", PixelPaddingValue=0),
            clip_percentile=clip,
        ).pixels
        assert (with_padding[border] == 0).all()
        assert np.array_equal(with_padding[100:-100, 100:-100], alone)
    # Without the tag the same zeros are image: MONOCHROME1 zero is white.
    unpadded = load_dicom(_dicom(tmp_path / "u.dcm", padded, 12, "MONOCHROME1")).pixels
    assert (unpadded[:100] == 65535).all()


def test_padding_range_limit(radiograph: np.ndarray, tmp_path: Path):
    pixels = _twelve_bit(radiograph)
    loaded = load_dicom(
        _dicom(tmp_path / "r.dcm", pixels, 12, PixelPaddingValue=4000, PixelPaddingRangeLimit=4095)
    ).pixels
    assert (loaded[pixels >= 4000] == 0).all()
    assert (loaded[pixels < 4000] == np.round(pixels[pixels < 4000] * 65535.0 / 4095)).all()


def test_percentile_clip(radiograph: np.ndarray, tmp_path: Path):
    """Hot and dead pixels no longer set the scale: the 1st..99th percentiles do."""
    pixels = _twelve_bit(radiograph)
    rng = np.random.default_rng(0)
    spots = rng.choice(pixels.size, pixels.size // 200, replace=False)
    pixels.flat[spots[::2]], pixels.flat[spots[1::2]] = 4095, 0
    png = _png16(tmp_path / "a.png", pixels, sbit=12)
    clipped = load_image(png, clip_percentile=1.0)
    scaled = pixels / 4095.0
    low, high = np.percentile(scaled, [1.0, 99.0])
    expected = np.round(np.clip((scaled - low) / (high - low), 0, 1) * 65535)
    assert np.array_equal(clipped, expected.astype(np.uint16))
    assert np.array_equal(
        clipped, load_dicom(_dicom(tmp_path / "a.dcm", pixels, 12), clip_percentile=1.0).pixels
    )
    # the clip is a per-image stretch: an 8-bit file becomes 16-bit to keep its precision
    eight = tmp_path / "e.png"
    Image.fromarray(radiograph).save(eight)
    assert load_image(eight, clip_percentile=1.0).dtype == np.uint16
    assert not np.array_equal(load_image(png), clipped)


@pytest.mark.parametrize("bad", [-1.0, 50.0, 75.0])
def test_clip_percentile_out_of_range_is_refused(tmp_path: Path, bad: float):
    from raydiology.data.ingest import ingest_images

    with pytest.raises(ValueError, match="clip_percentile"):
        ingest_images([tmp_path], tmp_path / "c", clip_percentile=bad, progress=False)


def test_cli_refuses_a_bad_clip_before_starting_anything(tmp_path: Path):
    from typer.testing import CliRunner

    from raydiology.cli import app

    args = ["ingest", str(tmp_path), "--out", str(tmp_path / "c"), "--clip-percentile", "60"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "expected 0 <= P < 50" in result.output
    assert not (tmp_path / "c").exists()
