"""Segmentation masks through the data path: phantom masks, the corpus's `mask_*` columns,
ingest from a mask folder and from CSV mask columns, and the pipeline moving masks with the
image's geometry (pad, crop, resize, flip)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydiology.config import AugmentConfig, DataConfig
from raydiology.data.corpus import CorpusError, CorpusWriter, read_manifest, read_rows
from raydiology.data.ingest import ingest_images
from raydiology.data.phantom import MASK_CLASSES, make_phantom, write_phantom_corpus
from raydiology.data.pipeline import preprocess_batch

COLUMNS = ["image_id", "pixels", "height", "width", "dtype"]


def _batch(corpus: Path, masks: list[str]) -> dict[str, np.ndarray]:
    table = read_rows(corpus, columns=[*COLUMNS, *masks])
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


# --- phantoms --------------------------------------------------------------------------------


def test_phantom_masks_outline_what_the_film_shows() -> None:
    rng = np.random.default_rng
    plain = make_phantom(rng(5), size=128, findings={"lung_lesion": True})
    case = make_phantom(rng(5), size=128, findings={"lung_lesion": True}, masks=True)
    assert plain.masks is None and np.array_equal(plain.image, case.image)  # film unchanged
    assert case.masks is not None and set(case.masks) == set(MASK_CLASSES)
    m = {k: v.astype(bool) for k, v in case.masks.items()}
    assert all(v.dtype == np.uint8 and v.shape == (128, 128) for v in case.masks.values())
    film = case.image.astype(np.float64)
    # air is dark, the heart bright; the lesion brighter than the lung around it
    assert film[m["lungs"]].mean() + 40 < film[m["heart"]].mean()
    assert not (m["lungs"] & m["heart"]).any()  # lung fields leave out the heart's shadow
    ring = m["lungs"] & ~m["lesion"]
    assert m["lesion"].sum() > 5 and film[m["lesion"]].mean() > film[ring].mean() + 15
    assert 0 < m["clavicles"].sum() < m["lungs"].sum()
    # no lesion drawn: an empty (annotated) lesion mask; lateral films get no masks
    healthy = make_phantom(rng(5), size=128, findings={"lung_lesion": False}, masks=True)
    assert healthy.masks is not None and not healthy.masks["lesion"].any()
    assert make_phantom(rng(5), size=128, masks=True, view="LATERAL").masks is None
    # rendered at 512 and upsampled like the film for larger sizes: same shapes, finer edges
    big = make_phantom(rng(5), size=1024, findings={"lung_lesion": True}, masks=True)
    assert big.masks is not None
    small = np.asarray(Image.fromarray(big.masks["heart"] * 255).resize((128, 128))) >= 128
    assert (small != m["heart"]).mean() < 0.01


def test_phantom_corpus_writes_mask_columns(tmp_path) -> None:
    manifest = write_phantom_corpus(tmp_path / "c", n=4, size=32, views=2, masks=True,
                                    progress=False)  # fmt: skip
    assert manifest.mask_columns == tuple(f"mask_{k}" for k in MASK_CLASSES)
    assert manifest.made_by["options"]["masks"] is True
    table = read_rows(tmp_path / "c", columns=["view", "mask_heart"])
    for view, blob in zip(table.column("view").to_pylist(), table.column("mask_heart").to_pylist(),
                          strict=True):  # fmt: skip
        assert (blob is None) == (view == "LATERAL")
        if blob is not None:
            assert len(blob) == 32 * 32 and set(blob) <= {0, 1}
    plain = write_phantom_corpus(tmp_path / "p", n=2, size=32, progress=False)
    assert plain.mask_columns == () and "masks" not in plain.made_by["options"]


def test_corpus_writer_checks_masks(tmp_path) -> None:
    pixels = np.zeros((8, 6), np.uint8)
    with (
        pytest.raises(CorpusError, match="mask of shape"),
        CorpusWriter(tmp_path / "a", made_by={}) as w,
    ):
        w.add({"image_id": "x", "pixels": pixels, "mask_heart": np.zeros((6, 8))})
    with (
        pytest.raises(CorpusError, match="mask columns"),
        CorpusWriter(tmp_path / "b", made_by={}) as w,
    ):
        w.add({"image_id": "x", "pixels": pixels, "mask_heart": None})
        w.add({"image_id": "y", "pixels": pixels, "mask_lungs": None})


# --- ingest round trip -------------------------------------------------------------------------


def _shapes(size: tuple[int, int], seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A grey film and two masks of random rectangles, at `size` (height, width)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size, dtype=np.uint8)
    masks = {}
    for name in ("heart", "left lung"):
        m = np.zeros(size, np.uint8)
        top, left = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        m[top : top + size[0] // 3, left : left + size[1] // 4] = 255
        masks[name] = m
    return image, masks


@pytest.mark.parametrize("source", ["folder", "csv"])
def test_png_masks_round_trip_through_ingest_and_pipeline(tmp_path, source) -> None:
    """PNG masks -> corpus -> pipeline -> the same pixels; a missing mask stays unknown."""
    images, truth = tmp_path / "images", {}
    images.mkdir()
    rows = []
    for i in range(3):
        image, masks = _shapes((48, 48), i)
        Image.fromarray(image).save(images / f"case{i}.png")
        truth[f"case{i}"] = masks
        entry = {"path": f"images/case{i}.png"}
        for name, m in masks.items():
            if name == "left lung" and i == 2:
                continue  # not annotated
            folder = tmp_path / "masks" / name
            folder.mkdir(parents=True, exist_ok=True)
            suffix = ".gif" if name == "left lung" else ".png"  # JSRT/SCR ships GIFs
            Image.fromarray(m).save(folder / f"case{i}{suffix}")
            entry[f"mask_{name.replace(' ', '_')}"] = f"masks/{name}/case{i}{suffix}"
        rows.append(entry)
    if source == "folder":
        args: dict = {"masks": tmp_path / "masks"}
        sources = [images]
    else:
        listing = tmp_path / "list.csv"
        with listing.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["path", "mask_heart", "mask_left_lung"])
            writer.writeheader()
            writer.writerows(rows)
        args, sources = {}, [listing]
    out = tmp_path / "corpus"
    ingest_images(sources, out, size=48, parallel=False, progress=False, salt="s", **args)
    columns = ["mask_heart", "mask_left_lung"]
    assert read_manifest(out).mask_columns == tuple(columns)

    batch = _batch(out, columns)
    result = preprocess_batch(batch, data=DataConfig(resolution=48), label_columns=[],
                              mask_columns=columns)  # fmt: skip
    ingested = {i.tobytes(): k for k, i in ((k, _shapes((48, 48), int(k[-1]))[0]) for k in truth)}
    for row in range(3):
        name = ingested[result["image"][row, 0].tobytes()]  # rows are shuffled by ingest
        for k, cls in enumerate(["heart", "left lung"]):
            known = not (cls == "left lung" and name == "case2")
            assert result["mask_known"][row, k] == known
            want = truth[name][cls] // 255 if known else np.zeros((48, 48), np.uint8)
            assert np.array_equal(result["mask"][row, k], want), (name, cls)


def test_ingest_fits_masks_like_their_images(tmp_path) -> None:
    """A non-square film padded and resized: its mask, here the film's own bright part,
    lands on the same pixels; a mask of the wrong size quarantines the image."""
    image = np.zeros((60, 90), np.uint8)
    image[10:40, 20:70] = 255
    (tmp_path / "img").mkdir()
    (tmp_path / "m" / "box").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "img" / "a.png")
    Image.fromarray(image).save(tmp_path / "m" / "box" / "a.png")
    Image.fromarray(image).save(tmp_path / "img" / "b.png")
    Image.fromarray(image[:50]).save(tmp_path / "m" / "box" / "b.png")
    summary = ingest_images([tmp_path / "img"], tmp_path / "c", size=45, masks=tmp_path / "m",
                            parallel=False, progress=False, salt="s")  # fmt: skip
    assert summary.ingested == 1 and summary.quarantined == 1
    batch = _batch(tmp_path / "c", ["mask_box"])
    out = preprocess_batch(batch, data=DataConfig(resolution=45), label_columns=[],
                           mask_columns=["mask_box"])  # fmt: skip
    inside = out["image"][0, 0] >= 128
    assert inside.sum() > 100 and (inside != out["mask"][0, 0].astype(bool)).mean() < 0.01
    with pytest.raises(ValueError, match="no image named"):
        Image.fromarray(image).save(tmp_path / "m" / "box" / "zzz.png")
        ingest_images([tmp_path / "img"], tmp_path / "d", size=45, masks=tmp_path / "m",
                      parallel=False, progress=False, salt="s")  # fmt: skip


# --- pipeline geometry -------------------------------------------------------------------------


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
def test_pipeline_moves_masks_with_the_image(tmp_path, fit) -> None:
    """Binary films whose mask is the film itself: after fit, random crop, resize and flip
    (both quantised/cut at half) the mask equals the bright pixels exactly, so any step
    applied to one and not the other would show."""
    rng = np.random.default_rng(0)
    with CorpusWriter(tmp_path / "c", made_by={}) as w:
        for i in range(12):
            shape = (40, 64) if i % 2 else (64, 40)
            film = np.zeros(shape, np.uint8)
            top, left = rng.integers(0, 20), rng.integers(0, 20)
            film[top : top + 15, left : left + 25] = 255
            film[2:6, 1:8] = 255  # an asymmetric mark: a flip of one and not the other shows
            w.add({"image_id": f"i{i}", "pixels": film, "mask_box": film,
                   "mask_none": None})  # fmt: skip
    batch = _batch(tmp_path / "c", ["mask_box", "mask_none"])
    data = DataConfig(resolution=32, fit=fit, shuffle_seed=1,
                      augment=AugmentConfig(hflip=True, crop_scale=(0.5, 1.0)))  # fmt: skip
    flips = 0
    for epoch in range(3):
        out = preprocess_batch(batch, data=data, label_columns=[], epoch=epoch,
                               mask_columns=["mask_box", "mask_none"])  # fmt: skip
        assert out["mask"].shape == (12, 2, 32, 32) and out["mask"].dtype == np.uint8
        assert out["mask_known"][:, 0].all() and not out["mask_known"][:, 1].any()
        assert not out["mask"][:, 1].any()
        assert np.array_equal(out["mask"][:, 0], (out["image"][:, 0] >= 128).astype(np.uint8))
        plain = preprocess_batch(batch, data=DataConfig(resolution=32, fit=fit, shuffle_seed=1),
                                 label_columns=[], mask_columns=["mask_box"])  # fmt: skip
        flips += int((out["image"] != plain["image"]).any())
    assert flips  # augmentation did move the films
