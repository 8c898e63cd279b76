"""Ingest of PNG/JPEG folders: real radiographs, padding geometry, and bad files quarantined."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydiology.data.corpus import decode_pixels, read_rows, verify_corpus
from raydiology.data.ingest import find_sources, image_id_for, ingest_images

HANNOVER = Path(__file__).resolve().parents[1].parent / "shared/data/hannover-cxr/png"
SIZE = 96


@pytest.fixture
def real_pngs() -> list[Path]:
    if not HANNOVER.is_dir():
        pytest.skip(f"real radiographs not found at {HANNOVER} (shared test data absent)")
    files = sorted(HANNOVER.glob("*.png"))[:20]
    assert len(files) == 20
    return files


def _batch(table):
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}


def _expected_geometry(path: Path) -> tuple[int, int]:
    width, height = Image.open(path).size
    scale = SIZE / max(width, height)
    return round(height * scale), round(width * scale)


def test_real_images_padded_and_centred(tmp_path, real_pngs):
    src = tmp_path / "src"
    (src / "nested" / "deeper").mkdir(parents=True)
    for i, f in enumerate(real_pngs):
        shutil.copy(f, src / ("nested/deeper" if i % 2 else ".") / f.name)
    summary = ingest_images(
        [src], tmp_path / "out", size=SIZE, salt="s", shard_rows=8, progress=False
    )
    assert (summary.found, summary.ingested, summary.quarantined, summary.duplicates) == (
        20,
        20,
        0,
        0,
    )
    assert summary.quarantine_file is None
    manifest = verify_corpus(tmp_path / "out")
    assert manifest.image_size == SIZE and manifest.dtype == "uint8" and len(manifest.shards) == 3
    assert manifest.made_by["options"]["resize"] == "pad" and manifest.made_by["options"]["salted"]

    table = read_rows(tmp_path / "out")
    images = decode_pixels(_batch(table))
    assert images.shape == (20, SIZE, SIZE)
    for col in ("split", "report", "view", "sex", "anatomy"):
        assert table.column(col).null_count == 20
    by_id = dict(zip(table.column("image_id").to_pylist(), images, strict=True))
    for f in sorted(src.rglob("*.png")):
        relative = f.relative_to(src).as_posix()
        image = by_id[image_id_for(relative, "s")]
        height, width = _expected_geometry(f)
        top, left = (SIZE - height) // 2, (SIZE - width) // 2
        content = image[top : top + height, left : left + width]
        assert image.sum() == content.sum()  # everything outside the content is zero padding
        assert (content.max(axis=1) > 0).all() and (content.max(axis=0) > 0).all()
        assert abs(content.mean() - np.asarray(Image.open(f)).mean()) < 3  # same picture


def test_stretch_and_16_bit(tmp_path, real_pngs):
    summary = ingest_images(
        real_pngs[:3], tmp_path / "out", size=SIZE, resize="stretch", bit_depth=16, progress=False
    )
    images = decode_pixels(_batch(read_rows(tmp_path / "out")))
    assert summary.manifest.dtype == "uint16" and images.dtype == np.uint16
    assert (images.max(axis=(1, 2)) > 255).all()  # 8-bit inputs scaled to the 16-bit range
    assert (images[:, 0, :].max(axis=1) > 0).all()  # stretched: no padding rows at the top


def test_bad_files_quarantined_and_duplicates_counted(tmp_path, real_pngs):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for f in real_pngs[:5]:
        shutil.copy(f, src / f.name)
    good = real_pngs[0].read_bytes()
    rng = np.random.default_rng(0)
    (src / "corrupt.png").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((64, 80), 128, np.uint8)).save(src / "grey.png")
    (src / "sub" / "zz_copy.png").write_bytes(good)  # exact duplicate of the first
    # extensions match case-insensitively; colour and 16-bit inputs become grayscale
    Image.open(real_pngs[5]).convert("RGB").save(src / "colour.JPG", quality=95)
    wide = np.asarray(Image.open(real_pngs[6])).astype(np.uint16) * 16  # 12-bit range
    Image.fromarray(wide).save(src / "sixteen.PNG")
    (src / "notes.txt").write_text("not an image")

    summary = ingest_images([src], tmp_path / "out", size=SIZE, salt="s", progress=False)
    assert summary.found == 12
    assert (summary.ingested, summary.quarantined, summary.duplicates) == (7, 4, 1)
    assert summary.found == summary.ingested + summary.quarantined + summary.duplicates
    assert summary.manifest.rows == 7 and summary.manifest.dtype == "uint8"

    # Side files name files by salted id, never by path (hospital paths carry patient ids).
    names = {image_id_for(f.relative_to(src).as_posix(), "s"): f.name for f in src.rglob("*")}
    lines = Path(summary.quarantine_file).read_text().splitlines()
    records = list(map(json.loads, lines))
    assert all(set(r) == {"file_id", "reason"} for r in records)
    reasons = {names[r["file_id"]]: r["reason"] for r in records}
    assert set(reasons) == {"corrupt.png", "truncated.png", "empty.png", "grey.png"}
    assert "empty" in reasons["empty.png"]
    assert "zero variance" in reasons["grey.png"]
    assert "unreadable" in reasons["corrupt.png"] and "unreadable" in reasons["truncated.png"]

    (dup,) = map(json.loads, (tmp_path / "out" / "duplicates.jsonl").read_text().splitlines())
    assert set(dup) == {"image_id", "duplicate_of", "kind"} and dup["kind"] == "exact"
    # Which copy is kept follows the seeded row order; the other is recorded by id.
    assert {names[dup["image_id"]], names[dup["duplicate_of"]]} == {
        "zz_copy.png",
        real_pngs[0].name,
    }
    ids = read_rows(tmp_path / "out", ["image_id"]).column("image_id").to_pylist()
    assert dup["duplicate_of"] in ids and dup["image_id"] not in ids
    for side in ("quarantine.jsonl", "duplicates.jsonl"):
        text = (tmp_path / "out" / side).read_text()
        assert str(tmp_path) not in text and ".png" not in text, f"a file name leaked into {side}"


def test_side_files_carry_paths_only_with_a_source_map(tmp_path, real_pngs):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(real_pngs[0], src / "a.png")
    shutil.copy(real_pngs[0], src / "b.png")
    (src / "c.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    ingest_images([src], out, size=SIZE, salt="s", write_source_map=True, progress=False)
    (dup,) = map(json.loads, (out / "duplicates.jsonl").read_text().splitlines())
    (bad,) = map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())
    assert Path(dup["path"]).name in {"a.png", "b.png"} and bad["path"] == str(src / "c.png")
    assert bad["file_id"] == image_id_for("c.png", "s")
    assert "c.png" not in bad["reason"]  # PIL quotes the path; the reason never does


def test_catch_all_quarantine_reason_is_scrubbed(tmp_path, real_pngs):
    # A listed file that vanished raises FileNotFoundError, whose message quotes the path:
    # the decoder's catch-all keeps only the exception type.
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\n{real_pngs[0]}\nPID-314159/ACC-2718.png\n")
    summary = ingest_images([listing], tmp_path / "out", size=SIZE, salt="s", progress=False)
    assert (summary.ingested, summary.quarantined) == (1, 1)
    text = (tmp_path / "out" / "quarantine.jsonl").read_text()
    assert "FileNotFoundError" in text
    for needle in ("314159", "2718", str(tmp_path)):
        assert needle not in text


def test_no_salt_warns_and_dicom_without_salt_is_refused(tmp_path, real_pngs, caplog):
    with caplog.at_level("WARNING", logger="raydiology.ingest"):
        ingest_images(real_pngs[:1], tmp_path / "png", size=SIZE, progress=False)
    assert "no id salt" in caplog.text and "RAYDIOLOGY_INGEST_SALT" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="raydiology.ingest"):
        ingest_images(real_pngs[:1], tmp_path / "salted", size=SIZE, salt="s", progress=False)
    assert "salt" not in caplog.text

    data = pytest.importorskip("pydicom.data", reason="pydicom-data is not installed")
    dicom = tmp_path / "export" / "1.2.840.113619.2.55"  # named by UID: found by its magic
    dicom.parent.mkdir()
    shutil.copy(data.get_testdata_file("CT_small.dcm"), dicom)
    assert [f.key for f in find_sources([dicom.parent])] == [dicom.name]
    with pytest.raises(ValueError, match=r"DICOM input needs an id salt.*RAYDIOLOGY_INGEST_SALT"):
        ingest_images([dicom.parent], tmp_path / "dicom", size=SIZE, progress=False)
    assert not (tmp_path / "dicom").exists()  # refused before anything was written


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ingest_images([tmp_path / "nowhere"], tmp_path / "out", progress=False)
