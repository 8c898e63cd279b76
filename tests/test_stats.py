"""Corpus statistics against direct pyarrow counts, and the contact sheet's size, determinism
and attribution."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydiology.data import stats
from raydiology.data.corpus import CorpusWriter, read_manifest, read_rows
from raydiology.data.phantom import write_phantom_corpus
from raydiology.data.stats import (
    TILE_PX,
    contact_sheet,
    corpus_stats,
    format_stats,
    sheet_caption,
    sheet_height,
)

CREDIT = "Example Hospital imaging archive (CC BY 4.0)"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    path = tmp_path_factory.mktemp("phantom")
    write_phantom_corpus(path, n=40, size=64, shard_rows=16, progress=False)
    return path


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """Nulls in every optional column, mixed sizes and bit depths, and an attribution."""
    path = tmp_path_factory.mktemp("sparse")
    rng = np.random.default_rng(0)
    with CorpusWriter(
        path, made_by={"command": "test", "attribution": CREDIT}, shard_rows=4, row_group_rows=2
    ) as writer:
        for i in range(10):
            dtype = np.uint8 if i % 2 else np.uint16
            side = 24 if i < 7 else 32
            writer.add(
                {
                    "image_id": f"img-{i}",
                    "pixels": rng.integers(0, 200, (side, side)).astype(dtype),
                    "report": "no acute findings" if i < 3 else None,
                    "view": ("PA", "AP", None)[i % 3],
                    "sex": "F" if i < 4 else None,
                    "split": "train",
                    "label_effusion": int(i < 5),
                    "region_chest": (0.1, 0.1, 0.9, 0.9) if i % 2 else None,
                }
            )
    return path


def _direct_counts(path, column: str) -> dict[str, int]:
    table = read_rows(path, columns=[column])
    return {
        "unknown" if v is None else v: n
        for v, n in collections.Counter(table.column(column).to_pylist()).items()
    }


def test_phantom_counts_match_pyarrow(phantom):
    stats = corpus_stats(phantom)
    table = read_rows(phantom, columns=["report", "label_cardiomegaly", "label_no_finding"])
    assert stats["rows"] == table.num_rows == 40
    assert stats["shards"] == 3
    assert stats["image_size"] == 64
    assert stats["bit_depth"] == 8
    for name in ("view", "anatomy", "sex", "age_group", "split"):
        assert stats[f"by_{name}"] == _direct_counts(phantom, name), name
        assert sum(stats[f"by_{name}"].values()) == 40
    assert stats["with_report"] == 40 - table.column("report").null_count
    assert set(stats["labels"]) == set(read_manifest(phantom).label_columns)
    for name in ("label_cardiomegaly", "label_no_finding"):
        assert stats["labels"][name] == pc.sum(table.column(name)).as_py()
    assert stats["attribution"] is None
    counts = list(stats["by_split"].values())
    assert counts == sorted(counts, reverse=True)  # most common first


def test_nulls_count_as_unknown(sparse):
    stats = corpus_stats(sparse)
    assert stats["rows"] == 10
    assert stats["by_view"] == {"AP": 3, "PA": 4, "unknown": 3}
    assert stats["by_sex"] == {"unknown": 6, "F": 4}
    assert stats["by_split"] == {"train": 10}
    # columns the writer fills with nulls when never given
    assert stats["by_anatomy"] == {"unknown": 10}
    assert stats["by_age_group"] == {"unknown": 10}
    assert stats["with_report"] == 3
    assert stats["labels"] == {"label_effusion": 5}
    assert stats["regions"] == {"region_chest": 5}
    assert stats["image_size"] == {"24x24": 7, "32x32": 3}
    assert stats["bit_depth"] == {"uint16": 5, "uint8": 5}
    assert stats["attribution"] == CREDIT


def test_format_stats_lists_every_count(phantom, sparse):
    text = format_stats(corpus_stats(phantom))
    assert "40 images in 3 shards" in text and "64x64 px" in text and "8-bit" in text
    assert "label_cardiomegaly" in text and "age_group" in text
    sparse_text = format_stats(corpus_stats(sparse))
    assert "unknown" in sparse_text and "Example Hospital" in sparse_text
    assert "24x24 (7)" in sparse_text


def test_contact_sheet_size_and_determinism(phantom, tmp_path):
    first = contact_sheet(phantom, tmp_path / "a.png", n=12, seed=3, columns=5)
    again = contact_sheet(phantom, tmp_path / "b.png", n=12, seed=3, columns=5)
    other = contact_sheet(phantom, tmp_path / "c.png", n=12, seed=4, columns=5)
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    with Image.open(first) as img:
        assert img.size == (5 * TILE_PX, sheet_height(12, columns=5, caption_lines=1))
        pixels = np.asarray(img.convert("L"))
    assert pixels[0, 0] < 20 and pixels[-1, -1] < 20  # dark background
    assert pixels.max() > 200  # but images on it


def test_contact_sheet_with_more_tiles_than_rows(sparse, tmp_path):
    out = contact_sheet(sparse, tmp_path / "all.png", n=64, columns=4)
    manifest = read_manifest(sparse)
    caption = sheet_caption(manifest, shown=10, seed=0, width_px=4 * TILE_PX)
    with Image.open(out) as img:
        assert img.size == (4 * TILE_PX, sheet_height(10, columns=4, caption_lines=len(caption)))
        description = img.text["Description"]
    assert "10 of 10 images" in description
    assert CREDIT in description  # the attribution travels into the picture's footer


def test_caption_carries_the_attribution(sparse, phantom):
    lines = sheet_caption(read_manifest(sparse), shown=10, seed=0, width_px=1280)
    assert lines[0].startswith("10 of 10 images, seed 0")
    assert " ".join(lines[1:]) == CREDIT
    narrow = sheet_caption(read_manifest(sparse), shown=10, seed=0, width_px=160)
    assert len(narrow) > 2 and " ".join(narrow[1:]) == CREDIT  # wrapped, nothing lost
    assert len(sheet_caption(read_manifest(phantom), shown=5, seed=0, width_px=1280)) == 1


def test_tiles_never_show_reports(tmp_path):
    secret = "Patient John Doe 1970-01-01"
    with CorpusWriter(tmp_path / "c", made_by={"command": "test"}) as writer:
        writer.add({"image_id": "x1", "pixels": np.zeros((8, 8), np.uint8), "report": secret})
    tiles = stats._read_tiles(stats.shard_paths(tmp_path / "c"), [0])
    assert tiles[0]["title"] == "unknown" and tiles[0]["id"] == "x1"
    assert secret not in repr({k: v for k, v in tiles[0].items() if k != "image"})


def test_counts_without_footer_statistics(sparse, tmp_path):
    """Corpora written by other tools may lack row-group null counts: the column is read."""
    copy = tmp_path / "copy"
    shutil.copytree(sparse, copy)
    for shard in sorted((copy / "shards").glob("*.parquet")):
        pq.write_table(pq.read_table(shard), shard, write_statistics=False)
    assert corpus_stats(copy) == corpus_stats(sparse)


def test_empty_corpus(tmp_path):
    with CorpusWriter(tmp_path / "empty", made_by={"command": "test"}):
        pass
    stats = corpus_stats(tmp_path / "empty")
    assert stats["rows"] == 0 and stats["image_size"] is None and stats["bit_depth"] is None
    assert "0 images" in format_stats(stats)
    with Image.open(contact_sheet(tmp_path / "empty", tmp_path / "e.png", columns=2)) as img:
        assert img.size == (2 * TILE_PX, sheet_height(0, columns=2, caption_lines=1))
