"""Ingest of PNG/JPEG folders: real radiographs, padding geometry, and bad files quarantined."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydiology.data.corpus import decode_pixels, read_rows, verify_corpus
from raydiology.data.ingest import image_id_for, ingest_images

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

    summary = ingest_images([src], tmp_path / "out", size=SIZE, progress=False)
    assert summary.found == 12
    assert (summary.ingested, summary.quarantined, summary.duplicates) == (7, 4, 1)
    assert summary.found == summary.ingested + summary.quarantined + summary.duplicates
    assert summary.manifest.rows == 7 and summary.manifest.dtype == "uint8"

    lines = Path(summary.quarantine_file).read_text().splitlines()
    reasons = {Path(r["path"]).name: r["reason"] for r in map(json.loads, lines)}
    assert set(reasons) == {"corrupt.png", "truncated.png", "empty.png", "grey.png"}
    assert "empty" in reasons["empty.png"]
    assert "zero variance" in reasons["grey.png"]
    assert "unreadable" in reasons["corrupt.png"] and "unreadable" in reasons["truncated.png"]

    (dup,) = map(json.loads, (tmp_path / "out" / "duplicates.jsonl").read_text().splitlines())
    assert Path(dup["path"]).name == "zz_copy.png"
    assert dup["duplicate_of"] == image_id_for(real_pngs[0].name, "")
    ids = read_rows(tmp_path / "out", ["image_id"]).column("image_id").to_pylist()
    assert dup["duplicate_of"] in ids


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ingest_images([tmp_path / "nowhere"], tmp_path / "out", progress=False)
