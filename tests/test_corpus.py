"""Corpus format v1: round trip, manifest, integrity checks and batch decoding."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydiology.data.corpus import (
    SCHEMA_VERSION,
    CorpusError,
    CorpusWriter,
    decode_pixels,
    manifest_hash,
    plan_shards,
    read_manifest,
    read_rows,
    shard_paths,
    verify_corpus,
    write_manifest,
    write_shard,
)

MADE_BY = {"command": "test", "options": {"k": 1}}


def _rows(n: int, size: int = 16, dtype=np.uint8) -> list[dict]:
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    return [
        {
            "image_id": f"img-{i:03d}",
            "pixels": rng.integers(0, top, (size, size), dtype=dtype, endpoint=True),
            "report": f"report {i}" if i % 3 else None,
            "view": "PA",
            "sex": None if i % 2 else "F",
            "split": "train",
            "label_a": i % 2,
            "label_b": 1 - i % 2,
        }
        for i in range(n)
    ]


def _batch(table) -> dict[str, np.ndarray]:
    """Column dict the way Ray Data's numpy batch format hands it to map_batches."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _write(path, rows, **kwargs):
    with CorpusWriter(path, made_by=MADE_BY, **kwargs) as writer:
        for row in rows:
            writer.add(row)
    return writer.manifest


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_round_trip(tmp_path, dtype):
    rows = _rows(10, dtype=dtype)
    _write(tmp_path / "c", rows, shard_rows=4, row_group_rows=2)
    table = read_rows(tmp_path / "c")
    assert table.column("image_id").to_pylist() == [r["image_id"] for r in rows]
    images = decode_pixels(_batch(table))
    assert images.dtype == dtype and images.shape == (10, 16, 16)
    for image, row in zip(images, rows, strict=True):
        np.testing.assert_array_equal(image, row["pixels"])
    for key in ("report", "view", "sex", "split", "label_a", "label_b"):
        assert table.column(key).to_pylist() == [r[key] for r in rows]
    assert table.column("anatomy").null_count == 10  # never given, stays null
    assert table.column("height").to_pylist() == [16] * 10


def test_manifest_fields(tmp_path):
    manifest = _write(tmp_path / "c", _rows(10), shard_rows=4, row_group_rows=2)
    assert manifest == read_manifest(tmp_path / "c")
    assert manifest.schema_version == SCHEMA_VERSION == 1
    assert manifest.rows == 10
    assert [s.rows for s in manifest.shards] == [4, 4, 2]
    assert [s.path for s in manifest.shards] == [f"shards/part-0000{i}.parquet" for i in range(3)]
    assert manifest.image_size == 16 and manifest.dtype == "uint8"
    assert manifest.columns["pixels"] == "binary" and manifest.columns["height"] == "int32"
    assert manifest.columns["label_a"] == "int8" and manifest.columns["report"] == "string"
    assert manifest.label_columns == ("label_a", "label_b")
    made = manifest.made_by
    assert (
        made["tool"] == "raydiology" and made["command"] == "test" and made["options"] == {"k": 1}
    )
    assert made["version"] and dt.datetime.fromisoformat(made["created"])
    paths = shard_paths(tmp_path / "c")
    assert paths == [str((tmp_path / "c" / s.path).resolve()) for s in manifest.shards]
    # row groups stay small so Ray Data can stream a shard piecewise
    assert pq.ParquetFile(paths[0]).metadata.num_row_groups == 2
    raw = (tmp_path / "c" / "manifest.json").read_bytes()
    assert manifest_hash(tmp_path / "c") == hashlib.sha256(raw).hexdigest()
    assert not list((tmp_path / "c").rglob("*.tmp"))


def test_mixed_sizes_have_no_image_size(tmp_path):
    rows = _rows(2)
    rows[1]["pixels"] = np.zeros((8, 16), np.uint8)
    manifest = _write(tmp_path / "c", rows)
    assert manifest.image_size is None and manifest.dtype == "uint8"


def test_verify_names_changed_and_missing_shard(tmp_path):
    corpus = tmp_path / "c"
    _write(corpus, _rows(10), shard_rows=4)
    assert verify_corpus(corpus).rows == 10
    shard = corpus / "shards" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match="part-00001"):
        verify_corpus(corpus)
    shard.unlink()
    with pytest.raises(CorpusError, match=r"part-00001.*missing"):
        verify_corpus(corpus)


def test_verify_names_every_bad_shard(tmp_path):
    corpus = tmp_path / "c"
    _write(corpus, _rows(12), shard_rows=4, row_group_rows=2)
    flipped = corpus / "shards" / "part-00001.parquet"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit, inside the pixel pages
    flipped.write_bytes(bytes(data))
    truncated = corpus / "shards" / "part-00002.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-200])  # a copy cut short: footer lost
    with pytest.raises(CorpusError) as caught:
        verify_corpus(corpus)
    message = str(caught.value)
    assert "2 of 3 shard(s) bad" in message and "part-00000" not in message
    assert "shards/part-00001.parquet: has sha256" in message
    assert "shards/part-00002.parquet: has sha256" in message and "unreadable" in message


def test_verify_reads_every_row_group_not_only_the_hash(tmp_path):
    # A manifest written after the damage (e.g. re-hashed by hand) vouches for a file that
    # cannot be read: readability is checked on its own.
    corpus = tmp_path / "c"
    _write(corpus, _rows(8), shard_rows=8, row_group_rows=2)
    shard = corpus / "shards" / "part-00000.parquet"
    meta = pq.ParquetFile(shard).metadata
    offset = meta.row_group(3).column(1).data_page_offset  # pixels of the last row group
    data = bytearray(shard.read_bytes())
    data[offset : offset + 64] = bytes(64)  # its page header zeroed; the footer is intact
    shard.write_bytes(bytes(data))
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match=r"part-00000.parquet: row group 3 unreadable"):
        verify_corpus(corpus)


def test_corpus_verify_command(tmp_path):
    from typer.testing import CliRunner

    from raydiology.cli import app

    corpus = tmp_path / "c"
    _write(corpus, _rows(10), shard_rows=4)
    ok = CliRunner().invoke(app, ["corpus", "verify", str(corpus)])
    assert ok.exit_code == 0, ok.output
    assert "3 shard(s), 10 rows" in ok.output
    shard = corpus / "shards" / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    bad = CliRunner().invoke(app, ["corpus", "verify", str(corpus)])
    assert bad.exit_code == 1
    assert "part-00002.parquet" in bad.output and "part-00001" not in bad.output


def test_manifest_errors(tmp_path):
    corpus = tmp_path / "c"
    with pytest.raises(CorpusError, match="no manifest"):
        read_manifest(corpus)
    _write(corpus, _rows(2))
    path = corpus / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(CorpusError, match="schema_version 2"):
        read_manifest(corpus)
    del data["columns"]
    path.write_text(json.dumps(data))
    with pytest.raises(CorpusError, match="'columns'"):
        read_manifest(corpus)
    path.write_text("{not json")
    with pytest.raises(CorpusError, match=str(path)):
        read_manifest(corpus)


def test_decode_mixed_sizes_names_the_image(tmp_path):
    rows = _rows(3)
    rows[2]["pixels"] = np.zeros((8, 8), np.uint8)
    _write(tmp_path / "c", rows)
    batch = _batch(read_rows(tmp_path / "c"))
    with pytest.raises(CorpusError, match="img-002 is 8x8"):
        decode_pixels(batch)
    assert decode_pixels({k: v[:2] for k, v in batch.items()}).shape == (2, 16, 16)


def test_writer_rejects_bad_rows(tmp_path):
    with CorpusWriter(tmp_path / "c", made_by=MADE_BY) as writer:
        row = _rows(1)[0]
        writer.add(row)
        with pytest.raises(CorpusError, match="duplicate image_id 'img-000'"):
            writer.add(row)
        with pytest.raises(CorpusError, match="unknown column 'colour'"):
            writer.add({**row, "image_id": "x", "colour": "red"})
        with pytest.raises(CorpusError, match="uint8/uint16"):
            writer.add({**row, "image_id": "y", "pixels": np.zeros((4, 4), np.float32)})
        with pytest.raises(CorpusError, match="label columns"):
            writer.add({"image_id": "z", "pixels": row["pixels"], "label_a": 1})
    with pytest.raises(CorpusError, match="already holds a corpus"):
        CorpusWriter(tmp_path / "c", made_by=MADE_BY)


def test_failed_write_leaves_no_manifest(tmp_path):
    with pytest.raises(RuntimeError), CorpusWriter(tmp_path / "c", made_by=MADE_BY) as writer:
        writer.add(_rows(1)[0])
        raise RuntimeError("boom")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_empty_corpus(tmp_path):
    manifest = _write(tmp_path / "c", [])
    assert manifest.rows == 0 and manifest.shards == () and manifest.image_size is None
    assert read_rows(tmp_path / "c").num_rows == 0


def test_region_columns_round_trip_into_training_batches(tmp_path):
    """A `region_*` box column is written, validated, and delivered by the pipeline."""
    from raydiology.config import DataConfig
    from raydiology.config_base import to_dict
    from raydiology.data.pipeline import preprocess_batch

    out = tmp_path / "c"
    with CorpusWriter(out, made_by={"command": "test"}) as writer:
        for i in range(3):
            box = (0.3, 0.15, 0.8, 0.8) if i else (0.1, 0.1, 0.9, 0.9)
            writer.add(
                {"image_id": f"r{i}", "pixels": np.zeros((16, 16), np.uint8), "region_chest": box}
            )
    table = read_rows(out)
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    got = preprocess_batch(
        batch,
        data=to_dict(DataConfig(resolution=16)),
        label_columns=[],
        extra_columns={"region": "region_chest"},
    )
    np.testing.assert_allclose(got["region"][0], [0.1, 0.1, 0.9, 0.9], rtol=1e-6)
    np.testing.assert_allclose(got["region"][2], [0.3, 0.15, 0.8, 0.8], rtol=1e-6)

    with (
        pytest.raises(CorpusError, match="region_chest"),
        CorpusWriter(tmp_path / "bad", made_by={"command": "test"}) as writer,
    ):
        writer.add(
            {
                "image_id": "x",
                "pixels": np.zeros((8, 8), np.uint8),
                "region_chest": (0.9, 0, 0.1, 1),
            }
        )


def test_shards_written_apart_equal_the_streamed_corpus(tmp_path):
    """`plan_shards` + `write_shard` + `write_manifest` (how ingest writes shards in parallel)
    reproduce CorpusWriter's files byte for byte: same row groups, studies kept whole."""
    rows = _rows(13)
    for i, row in enumerate(rows):
        row["study_id"] = f"s{i // 3}" if i < 9 else None  # studies of 3 views, then singles
    rows[9]["pixels"] = np.zeros((16, 40), np.uint8)  # a bigger image: the byte limit bites
    layout = {"shard_rows": 5, "row_group_rows": 2, "row_group_bytes": 600}
    streamed = _write(tmp_path / "streamed", rows, **layout)

    table = read_rows(tmp_path / "streamed")
    sizes = [len(b) for b in table.column("pixels").to_pylist()]
    plan = plan_shards(zip(sizes, table.column("study_id").to_pylist(), strict=True), **layout)
    schema = pq.read_schema(shard_paths(tmp_path / "streamed")[0])
    shards, start = [], 0
    for index, groups in enumerate(plan):
        pieces = []
        for n in groups:
            pieces.append(table.slice(start, n))
            start += n
        shards.append(write_shard(tmp_path / "apart", index, pieces, schema=schema))
    apart = write_manifest(
        tmp_path / "apart",
        shards,
        schema=schema,
        sizes=[(16, 16), (16, 40)],
        dtypes=["uint8"],
        made_by=MADE_BY,
    )

    assert apart.shards == streamed.shards  # paths, rows and sha256 all equal
    assert apart.columns == streamed.columns and apart.label_columns == streamed.label_columns
    assert apart.image_size is None and apart.made_by["options"] == {"k": 1}
    for path, groups in zip(shard_paths(tmp_path / "apart"), plan, strict=True):
        meta = pq.ParquetFile(path).metadata
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == groups
    # Studies of 3 stay whole (over row_group_rows, and shard 0 over shard_rows); the 640-byte
    # image fills a group alone; a shard's last group is cut to the shard's room.
    assert plan == [[3, 3], [3, 1, 1], [2]]
    assert [s.rows for s in streamed.shards] == [6, 5, 2]
    verify_corpus(tmp_path / "apart")
