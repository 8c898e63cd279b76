"""Ingest at scale: the real Hannover folder with planted bad files on a real local Ray,
DICOM without patient data leaking, resumable chunks, CSV file lists and report joins."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydiology.data.corpus import (
    CorpusWriter,
    decode_pixels,
    read_manifest,
    read_rows,
    verify_corpus,
)
from raydiology.data.dedup import DEFAULT_MAX_DISTANCE
from raydiology.data.ingest import (
    STAGING_DIR,
    IngestOptions,
    decode_chunk,
    find_sources,
    image_id_for,
    ingest_images,
    report_columns,
    shuffled,
)

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-314159",
    "PatientBirthDate": "19450704",
    "InstitutionName": "St. Planted Hospital",
    "AccessionNumber": "ACC-27182818",
}


def _batch(table):
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}


def _dicom_file(name: str) -> Path:
    data = pytest.importorskip("pydicom.data", reason="pydicom-data is not installed")
    try:
        return Path(data.get_testdata_file(name))
    except Exception:  # pragma: no cover - depends on the installed data package
        pytest.skip(f"{name} is not in pydicom-data")


@pytest.mark.ray
def test_hannover_folder_with_planted_bad_files_on_ray(ray_cluster, tmp_path, hannover_png):
    src = tmp_path / "src"
    shutil.copytree(hannover_png, src / "hannover")
    good = sorted((src / "hannover").glob("*.png"))
    (src / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(5000))
    (src / "truncated.png").write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])
    (src / "empty.png").write_bytes(b"")
    Image.new("L", (300, 300), 128).save(src / "flat.png")
    shutil.copy(good[1], src / "copy_of_one.png")
    out = tmp_path / "corpus"

    summary = ingest_images(
        [src], out, size=64, chunk_rows=64, salt="s", parallel=True, progress=False
    )

    assert summary.found == len(good) + 5
    assert summary.found == summary.ingested + summary.quarantined + summary.duplicates
    names = {image_id_for(f.relative_to(src).as_posix(), "s"): f.name for f in src.rglob("*")}
    quarantine = {
        names[q["file_id"]]: q["reason"]
        for q in map(json.loads, (out / "quarantine.jsonl").read_text().splitlines())
    }
    assert set(quarantine) == {"corrupt.png", "truncated.png", "empty.png", "flat.png"}
    assert "zero variance" in quarantine["flat.png"] and "empty" in quarantine["empty.png"]
    duplicates = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    (exact,) = [d for d in duplicates if d["kind"] == "exact"]
    assert names[exact["image_id"]] in {"copy_of_one.png", good[1].name}
    # Real data has near duplicates too (follow-up films of one patient); each is recorded
    # with its distance and what it duplicates, and everything else is in the corpus.
    near = [d for d in duplicates if d["kind"] == "near"]
    assert all(d["distance"] <= DEFAULT_MAX_DISTANCE and d["duplicate_of"] for d in near)
    assert summary.ingested == len(good) + 1 - len(duplicates)
    verify_corpus(out)
    assert not (out / STAGING_DIR).exists()

    again = ingest_images(
        [src], out, size=64, chunk_rows=64, salt="s", parallel=True, progress=False
    )
    assert again.skipped_chunks == -1 and again.ingested == summary.ingested  # a no-op


def test_interrupted_ingest_reuses_finished_chunks(tmp_path, hannover_png):
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted(hannover_png.glob("*.png"))[:12]:
        shutil.copy(path, src / path.name)
    out = tmp_path / "corpus"
    files = shuffled(find_sources([src]), {}, seed=0)  # the order ingest stores them in
    # An earlier run got as far as the first chunk before it died.
    (out / STAGING_DIR).mkdir(parents=True)
    decode_chunk(0, files[:4], 0, IngestOptions(size=48), "", str(out / STAGING_DIR))

    summary = ingest_images([src], out, size=48, chunk_rows=4, parallel=False, progress=False)
    assert summary.skipped_chunks == 1 and summary.ingested == 12

    with pytest.raises(FileExistsError, match=r"other sources or options \(changed: size\)"):
        ingest_images([src], out, size=64, chunk_rows=4, parallel=False, progress=False)


def test_dicom_ingest_is_not_inverted_and_lossless_copy_is_a_duplicate(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(_dicom_file("RG1_UNCR.dcm"), src / "a_uncompressed.dcm")
    shutil.copy(_dicom_file("RG1_J2KR.dcm"), src / "b_jpeg2000")  # no extension: found by magic
    summary = ingest_images([src], tmp_path / "c", size=256, bit_depth=16, salt="s", progress=False)
    assert (summary.found, summary.ingested, summary.duplicates) == (2, 1, 1)
    (dup,) = map(json.loads, (tmp_path / "c" / "duplicates.jsonl").read_text().splitlines())
    table = read_rows(tmp_path / "c")
    assert dup["kind"] == "exact" and dup["duplicate_of"] == table.column("image_id")[0].as_py()

    image = decode_pixels(_batch(table))[0].astype(float)
    assert table.column("dtype")[0].as_py() == "uint16"
    assert table.column("view")[0].as_py() is not None  # from ViewPosition
    # Bone bright, air dark: the mediastinum/spine strip outshines the lung fields.
    h, w = image.shape
    centre = image[h // 3 : 2 * h // 3, int(w * 0.45) : int(w * 0.55)].mean()
    lungs = np.mean(
        [
            image[h // 3 : 2 * h // 3, int(w * 0.2) : int(w * 0.3)].mean(),
            image[h // 3 : 2 * h // 3, int(w * 0.7) : int(w * 0.8)].mean(),
        ]
    )
    assert centre > lungs


def test_planted_patient_data_never_reaches_corpus_or_logs(tmp_path, caplog, capsys):
    import pydicom

    ds = pydicom.dcmread(_dicom_file("RG1_UNCR.dcm"))
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    src = tmp_path / "src"
    src.mkdir()
    ds.save_as(src / "planted.dcm")
    broken = pydicom.dcmread(_dicom_file("RG1_UNCR.dcm"))
    for keyword, value in PHI.items():
        setattr(broken, keyword, value)
    broken.PhotometricInterpretation = "RGB"  # quarantined: its reason must not leak either
    broken.save_as(src / "broken.dcm")
    out = tmp_path / "corpus"

    with caplog.at_level(logging.DEBUG):
        summary = ingest_images(
            [src], out, size=128, salt="s3cret", write_source_map=True, progress=True
        )
    assert summary.ingested == 1 and summary.quarantined == 1

    captured = capsys.readouterr()
    logs = caplog.text + captured.out + captured.err
    needles = [v.encode() for v in PHI.values()] + [b"Doe", b"Jane", b"314159", b"s3cret"]
    for needle in needles:
        assert needle.decode() not in logs
        for path in out.rglob("*"):
            if path.is_file() and path.name != "source_map.csv":
                assert needle not in path.read_bytes(), f"{needle!r} leaked into {path.name}"
    # The id -> file mapping exists only because it was asked for, in its own file.
    rows = list(csv.DictReader((out / "source_map.csv").open()))
    assert rows == [{"image_id": read_rows(out).column("image_id")[0].as_py(),
                     "path": str(src / "planted.dcm")}]  # fmt: skip


def test_file_list_metadata_and_joined_reports(tmp_path, hannover_png):
    from raydiology.data.reports import ReportRecord

    images = sorted(hannover_png.glob("*.png"))[:3]
    listing = tmp_path / "list.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "view", "label_effusion"])
        for i, image in enumerate(images):
            writer.writerow([str(image), "PA" if i else "AP", i % 2])
    record = ReportRecord(
        study_id="s1",
        image_keys=(images[0].stem,),
        report="Heart normal.. Lungs clear.",
        findings="Heart normal..",
        impression=None,
        split="train",
    )
    reports = report_columns([record], clean="iu")
    summary = ingest_images([listing], tmp_path / "c", size=64, reports=reports, progress=False)
    assert summary.ingested == 3
    by_id = {r["image_id"]: r for r in read_rows(tmp_path / "c").to_pylist()}
    table = [by_id[image_id_for(str(image), "")] for image in images]  # in listed order
    assert [r["view"] for r in table] == ["AP", "PA", "PA"]
    assert [r["label_effusion"] for r in table] == [0, 1, 0]
    assert table[0]["report"] == "heart normal . lungs clear ." and table[0]["split"] == "train"
    # the sections stay apart for protocols that score one (cleaned alike)
    assert (table[0]["findings"], table[0]["impression"]) == ("heart normal .", None)
    assert table[1]["report"] is None


def test_file_list_with_an_unknown_column_names_it(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("path,colour\nx.png,red\n")
    with pytest.raises(ValueError, match="colour"):
        find_sources([listing])


def test_shortest_side_storage_keeps_aspect(tmp_path, hannover_png):
    image = sorted(hannover_png.glob("*.png"))[0]
    width, height = Image.open(image).size
    ingest_images([image], tmp_path / "c", size=64, resize="shortest", progress=False)
    row = read_rows(tmp_path / "c").to_pylist()[0]
    assert min(row["height"], row["width"]) == 64
    assert row["width"] / row["height"] == pytest.approx(width / height, rel=0.05)


# --- shard writing: resumable, parallel == serial ----------------------------------------


@pytest.fixture
def hannover_24(tmp_path, hannover_png) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted(hannover_png.glob("*.png"))[:24]:
        shutil.copy(path, src / path.name)
    return src


def _ingest_small(src: Path, out: Path, *, parallel: bool):
    return ingest_images(
        [src], out, size=32, chunk_rows=8, shard_rows=4, parallel=parallel, progress=False
    )


def _shard_hashes(out: Path) -> list[str]:
    return [s.sha256 for s in read_manifest(out).shards]


def _block_shard(out: Path, index: int) -> Path:
    """Make writing shard `index` fail: a folder takes its temp file's name."""
    blocker = out / "shards" / f"part-{index:05d}.parquet.tmp"
    blocker.mkdir(parents=True)
    return blocker


def test_interrupted_shard_writing_resumes_to_the_same_corpus(tmp_path, hannover_24):
    reference = _ingest_small(hannover_24, tmp_path / "reference", parallel=False)
    shards = len(reference.manifest.shards)
    assert shards >= 4 and reference.found == 24

    out = tmp_path / "cut"
    blocker = _block_shard(out, 2)
    with pytest.raises(OSError, match="part-00002"):
        _ingest_small(hannover_24, out, parallel=False)
    assert not (out / "manifest.json").exists()  # an unfinished corpus cannot be read
    written = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert written == ["part-00000.parquet", "part-00001.parquet"]
    blocker.rmdir()
    # Shard 1 was damaged after its marker was written: the marker no longer vouches for it.
    damaged = out / "shards" / "part-00001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])

    resumed = _ingest_small(hannover_24, out, parallel=False)
    assert resumed.skipped_chunks == 3 and resumed.skipped_shards == 1  # only shard 0 kept
    assert (resumed.found, resumed.ingested, resumed.quarantined, resumed.duplicates) == (
        reference.found,
        reference.ingested,
        reference.quarantined,
        reference.duplicates,
    )
    assert _shard_hashes(out) == _shard_hashes(tmp_path / "reference")
    assert read_rows(out).equals(read_rows(tmp_path / "reference"))  # ids, pixels, metadata
    verify_corpus(out)
    assert not (out / STAGING_DIR).exists()

    # The Arrow-native shard writer lays rows out exactly as the streaming CorpusWriter.
    with CorpusWriter(tmp_path / "streamed", made_by={"command": "test"}, shard_rows=4) as w:
        for row in read_rows(out).to_pylist():
            shape = (row["height"], row["width"])
            w.add({**row, "pixels": np.frombuffer(row["pixels"], row["dtype"]).reshape(shape)})
    assert _shard_hashes(tmp_path / "streamed") == _shard_hashes(out)


@pytest.mark.ray
def test_parallel_shard_writing_equals_serial_and_resumes(ray_cluster, tmp_path, hannover_24):
    serial = _ingest_small(hannover_24, tmp_path / "serial", parallel=False)
    shards = len(serial.manifest.shards)

    out = tmp_path / "parallel"
    blocker = _block_shard(out, 1)
    with pytest.raises(Exception, match="part-00001"):
        _ingest_small(hannover_24, out, parallel=True)
    # The failed task did not stop the others: every other shard was finished first.
    written = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert written == [f"part-{i:05d}.parquet" for i in range(shards) if i != 1]
    blocker.rmdir()

    resumed = _ingest_small(hannover_24, out, parallel=True)
    assert resumed.skipped_chunks == 3 and resumed.skipped_shards == shards - 1
    assert resumed.found == resumed.ingested + resumed.quarantined + resumed.duplicates
    assert _shard_hashes(out) == _shard_hashes(tmp_path / "serial")
    assert read_rows(out).equals(read_rows(tmp_path / "serial"))
    verify_corpus(out)


# --- resume keyed by the exact files: a changed list never mixes old rows with new ones ---


def _interrupted(src: Path, out: Path, *, chunk_rows: int) -> None:
    """An ingest that decoded every chunk, then died writing shard 0 (staging left)."""
    blocker = _block_shard(out, 0)
    with pytest.raises(OSError, match="part-00000"):
        _ingest_resumable(src, out, chunk_rows=chunk_rows)
    blocker.rmdir()
    assert list((out / STAGING_DIR).glob("chunk-*.json"))


def _ingest_resumable(src: Path, out: Path, *, chunk_rows: int):
    """Sequential (not on a Ray another test may have started): a blocked shard stops the
    writing there, so which markers exist is fixed."""
    return ingest_images(
        [src], out, size=32, chunk_rows=chunk_rows, shard_rows=4, parallel=False, progress=False
    )


def _equal_corpora(a: Path, b: Path) -> None:
    rows = read_rows(a)
    ids = rows.column("image_id").to_pylist()
    assert len(ids) == len(set(ids))
    assert rows.equals(read_rows(b))  # the same ids on the same pixels, in the same order


def test_resume_after_a_file_is_added_equals_a_fresh_ingest(tmp_path, hannover_png):
    src = tmp_path / "src"
    src.mkdir()
    images = sorted(hannover_png.glob("*.png"))
    for path in images[:6]:
        shutil.copy(path, src / path.name)
    out = tmp_path / "resumed"
    _interrupted(src, out, chunk_rows=3)
    shutil.copy(images[6], src / "0000_added.png")  # sorts first: every index shifts

    resumed = _ingest_resumable(src, out, chunk_rows=3)
    fresh = _ingest_resumable(src, tmp_path / "fresh", chunk_rows=3)
    assert (resumed.found, resumed.ingested, resumed.quarantined) == (7, 7, 0)
    _equal_corpora(out, tmp_path / "fresh")
    assert fresh.ingested == 7


def test_resume_with_other_chunk_rows_equals_a_fresh_ingest(tmp_path, hannover_png):
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted(hannover_png.glob("*.png"))[:6]:
        shutil.copy(path, src / path.name)
    out = tmp_path / "resumed"
    _interrupted(src, out, chunk_rows=3)

    # Before: "found 6, ingested 7, quarantined 1" and one image id twice.
    resumed = _ingest_resumable(src, out, chunk_rows=2)
    assert (resumed.found, resumed.ingested, resumed.quarantined) == (6, 6, 0)
    assert resumed.skipped_chunks == 0  # every chunk holds other files now
    _ingest_resumable(src, tmp_path / "fresh", chunk_rows=2)
    _equal_corpora(out, tmp_path / "fresh")


def test_truncated_done_markers_are_redone_not_fatal(tmp_path, hannover_24):
    reference = tmp_path / "reference"
    _ingest_resumable(hannover_24, reference, chunk_rows=8)
    out = tmp_path / "cut"
    blocker = _block_shard(out, 2)
    with pytest.raises(OSError, match="part-00002"):
        _ingest_resumable(hannover_24, out, chunk_rows=8)
    blocker.rmdir()
    # What an older, non-atomic writer left when it died mid-write.
    for marker in ("chunk-00001.json", "shard-00000.json"):
        path = out / STAGING_DIR / marker
        path.write_text(path.read_text()[:20])

    resumed = _ingest_resumable(hannover_24, out, chunk_rows=8)
    assert resumed.skipped_chunks == 2 and resumed.skipped_shards == 1  # chunk 1, shard 0 redone
    _equal_corpora(out, reference)
    verify_corpus(out)


# --- stored order: seeded shuffle, studies kept together ------------------------------


def test_rows_are_stored_in_a_seeded_order_that_keeps_studies_together(tmp_path, hannover_png):
    images = sorted(hannover_png.glob("*.png"))[:24]
    listing = tmp_path / "list.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "study_id"])
        for i, image in enumerate(images):
            writer.writerow([str(image), f"study-{i // 2:02d}"])  # two views per study

    def stored(out: str, seed: int) -> list[str]:
        ingest_images([listing], tmp_path / out, size=16, salt="s", shuffle_seed=seed,
                      progress=False)  # fmt: skip
        return read_rows(tmp_path / out, ["study_id"]).column("study_id").to_pylist()

    order = stored("a", 0)
    assert sorted(order) == sorted(f"study-{i // 2:02d}" for i in range(24))
    assert order != sorted(order)  # not the path order: a row group mixes studies
    assert all(order[i] == order[i + 1] for i in range(0, 24, 2))  # views stay adjacent
    assert stored("b", 0) == order  # deterministic for the same files and seed
    assert stored("c", 1) != order
    assert read_manifest(tmp_path / "a").made_by["options"]["shuffle_seed"] == 0
