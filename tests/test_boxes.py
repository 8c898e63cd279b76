"""Box lists through the data path: phantom lesion boxes and grounding phrases, the corpus's
`boxes` column, ingest from a CSV column, and the pipeline moving boxes with the image's
geometry (pad, crop, resize, flip) exactly as it moves the image."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydiology.config import AugmentConfig, DataConfig
from raydiology.data.corpus import CorpusError, CorpusWriter, read_manifest, read_rows
from raydiology.data.ingest import ingest_images
from raydiology.data.phantom import make_phantom, write_phantom_corpus
from raydiology.data.pipeline import preprocess_batch

COLUMNS = ["image_id", "pixels", "height", "width", "dtype", "boxes"]


def _batch(corpus: Path, extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    table = read_rows(corpus, columns=[*COLUMNS, *extra])
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _extent(mask: np.ndarray) -> list[float]:
    """The bounding box [x0, y0, x1, y1] (exclusive ends) of a 2-D mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def test_phantom_lesion_box_is_the_lesion_with_its_report_phrase(tmp_path) -> None:
    rng = np.random.default_rng
    case = make_phantom(rng(3), size=128, findings={"lung_lesion": True}, boxes=True, masks=True)
    plain = make_phantom(rng(3), size=128, findings={"lung_lesion": True})
    assert np.array_equal(case.image, plain.image)  # boxes never change the film
    assert case.masks is not None and case.boxes is not None and len(case.boxes) == 1
    box = case.boxes[0]
    assert box[:4] == _extent(case.masks["lesion"]) and box[4] == "lung_lesion"
    phrase = str(box[5])
    assert "nodule" in phrase and phrase in case.report and case.side["lung_lesion"] in phrase
    # the patient's right is the film's left (PA)
    centre = (box[0] + box[2]) / 2  # type: ignore[operator]
    assert (centre < 64) == (case.side["lung_lesion"] == "right")
    assert make_phantom(rng(3), size=64, findings={"lung_lesion": False}, boxes=True).boxes == []
    assert make_phantom(rng(3), size=64, boxes=True, view="LATERAL").boxes is None

    manifest = write_phantom_corpus(tmp_path / "c", n=6, size=32, views=2, boxes=True,
                                    finding_prob=0.5, progress=False)  # fmt: skip
    assert "boxes" in manifest.columns and not manifest.mask_columns
    rows = read_rows(tmp_path / "c", columns=["image_id", "view", "boxes"]).to_pylist()
    assert all((r["boxes"] is None) == (r["view"] == "LATERAL") for r in rows)
    assert any(json.loads(r["boxes"] or "[]") for r in rows)


def test_corpus_writer_checks_boxes(tmp_path) -> None:
    pixels = np.zeros((8, 6), np.uint8)
    for bad, match in (
        ([[0, 0, 7, 4, "x"]], "inside the 6x8"),  # x1 beyond the width
        ([[2, 0, 1, 4, "x"]], "inside"),  # x1 < x0
        ([[0, 0, 1, 1]], "label"),
        ([[0, 0, 1, 1, ""]], "non-empty"),
        ("{oops", "not JSON"),
    ):
        with pytest.raises(CorpusError, match=match), CorpusWriter(tmp_path / "c", made_by={}) as w:
            w.add({"image_id": "a", "pixels": pixels, "boxes": bad})
    differs = pytest.raises(CorpusError, match="boxes column differs")
    with differs, CorpusWriter(tmp_path / "d", made_by={}) as w:
        w.add({"image_id": "a", "pixels": pixels, "boxes": []})
        w.add({"image_id": "b", "pixels": pixels})


def test_csv_boxes_round_trip_through_ingest_and_pipeline(tmp_path) -> None:
    """Boxes in a CSV column, on non-square films padded and resized by ingest: the stored
    box is the source box scaled and shifted like the image, and without augmentation the
    pipeline returns it at the model's resolution (the bright block it outlines is there)."""
    (tmp_path / "img").mkdir()
    listing, truth = [], {}
    for i, (h, w) in enumerate([(60, 90), (90, 60), (64, 64)]):
        film = np.zeros((h, w), np.uint8)
        x0, y0 = 6 + 3 * i, 10 + 2 * i
        film[y0 : y0 + 24, x0 : x0 + 30] = 255
        Image.fromarray(film).save(tmp_path / "img" / f"f{i}.png")
        boxes = [[x0, y0, x0 + 30, y0 + 24, "block", f"a block {i}"]]
        listing.append({"path": f"img/f{i}.png", "boxes": json.dumps(boxes) if i < 2 else ""})
        truth[i] = (h, w, boxes)
    with (tmp_path / "list.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "boxes"])
        writer.writeheader()
        writer.writerows(listing)
    out = tmp_path / "c"
    ingest_images([tmp_path / "list.csv"], out, size=45, parallel=False, progress=False, salt="s")
    assert "boxes" in read_manifest(out).columns
    batch = _batch(out)
    seen = 0
    for stored, text in zip(batch["pixels"], batch["boxes"], strict=True):
        if text is None:  # the film listed without boxes: not annotated
            continue
        (box,) = json.loads(text)
        film = np.frombuffer(stored, np.uint8).reshape(45, 45)
        assert box[4:6] == ["block", box[5]] and box[5].startswith("a block")
        # the stored block's extent is the stored box, to the pixel Lanczos blurs
        assert np.allclose(box[:4], _extent(film >= 128), atol=1.0)
        i = int(box[5][-1])
        h, w, _ = truth[i]
        scale = 45 / max(h, w)
        assert np.isclose(box[2] - box[0], 30 * round(w * scale) / w)
        assert np.isclose(box[3] - box[1], 24 * round(h * scale) / h)
        seen += 1
    assert seen == 2
    result = preprocess_batch(batch, data=DataConfig(resolution=90), label_columns=[],
                              box_column="boxes")  # fmt: skip
    assert result["boxes"].shape == (3, 1, 4) and result["box_known"].sum() == 2
    for row in np.flatnonzero(result["box_known"]):
        (stored,) = json.loads(batch["boxes"][row])
        assert np.allclose(result["boxes"][row, 0], np.array(stored[:4]) * 2, atol=1e-4)
        assert result["box_label"][row] == ["block"] and result["box_phrase"][row] == [stored[5]]
    unknown = int(np.flatnonzero(~result["box_known"])[0])
    assert np.isnan(result["boxes"][unknown]).all() and result["box_label"][unknown] == []


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
def test_pipeline_moves_boxes_with_the_image(tmp_path, fit) -> None:
    """Each film's mask is its box, filled: after fit, random crop, resize and flip, the
    moved box must outline the moved mask (to a pixel of resampling), so a flip or crop
    applied to the image and not the box would show."""
    rng = np.random.default_rng(0)
    with CorpusWriter(tmp_path / "c", made_by={}) as w:
        for i in range(12):
            shape = (40, 64) if i % 2 else (64, 40)
            film = np.zeros(shape, np.uint8)
            boxes = []
            for _ in range(1 + i % 2):  # one or two boxes a film
                top, left = int(rng.integers(0, 20)), int(rng.integers(0, 15))
                film[top : top + 18, left : left + 22] = 255
                boxes.append([left, top, left + 22, top + 18, "b"])
            w.add({"image_id": f"i{i}", "pixels": film, "mask_box": film, "boxes": boxes})
    batch = _batch(tmp_path / "c", ("mask_box",))
    data = DataConfig(resolution=32, fit=fit, shuffle_seed=1,
                      augment=AugmentConfig(hflip=True, crop_scale=(0.6, 1.0)))  # fmt: skip
    checked = 0
    for epoch in range(3):
        out = preprocess_batch(batch, data=data, label_columns=[], epoch=epoch,
                               mask_columns=["mask_box"], box_column="boxes")  # fmt: skip
        assert out["boxes"].shape == (12, 2, 4) and out["box_known"].all()
        for row in range(12):
            boxes = out["boxes"][row][~np.isnan(out["boxes"][row, :, 0])]
            mask = out["mask"][row, 0].astype(bool)
            if not len(boxes) or not mask.any():
                continue
            covered = np.zeros_like(mask)
            for x0, y0, x1, y1 in boxes:
                covered[round(y0) : round(y1), round(x0) : round(x1)] = True
            # the union of the boxes is the mask, up to the resampled edge pixels
            assert (covered != mask).sum() <= 2 * (mask.shape[0] + mask.shape[1]) * 0.35 + 4
            assert _extent(covered) == pytest.approx(_extent(mask), abs=1.0)
            checked += 1
    assert checked > 20
