"""What a corpus holds: counts per metadata value, and a contact sheet to look at.

Both work on corpora of millions of images. `corpus_stats` projects the small columns out of
each shard (Parquet is columnar, so the pixel bytes are never read) and takes "has a report"
from the row-group null counts in the footers when the writer recorded them. `contact_sheet`
locates its random rows through the footers and reads only the row groups that hold them.

Tiles name only the view, anatomy and split, plus the short image_id: never report text,
which can carry names and dates, and which a picture would spread beyond the corpus's access
controls.
"""

from __future__ import annotations

import os
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from raydiology.data.corpus import (
    LABEL_PREFIX,
    REGION_PREFIX,
    CorpusError,
    Manifest,
    read_manifest,
    shard_paths,
)

UNKNOWN = "unknown"
_COUNTED = ("view", "anatomy", "sex", "age_group", "split")  # each gives stats["by_<name>"]
_BATCH_ROWS = 65_536

# Contact sheet geometry in pixels (saved at 100 dpi, so one inch of figure is 100 px).
TILE_PX = 160  # each tile's image area, square
LABEL_PX = 30  # two lines of text above each image
FOOTER_LINE_PX = 16
FOOTER_PAD_PX = 10
_DPI = 100
_BACKGROUND = "#0b0c0e"
_TEXT = "#d8dade"
_DIM = "#7c828c"


# -- statistics -------------------------------------------------------------------------------


def corpus_stats(corpus_dir: str | os.PathLike) -> dict[str, Any]:
    """Counts over the whole corpus, reading only the small columns.

    Returns {"rows", "shards", "image_size" (the side when every image is one square, else
    {"HxW": n}), "bit_depth" (8 or 16 when uniform, else {dtype: n}), "by_view",
    "by_anatomy", "by_sex", "by_age_group", "by_split" ({value or "unknown": n}, most common
    first), "labels" ({label column: positives}), "regions" ({region column: rows with a
    box}), "with_report", "attribution" (the licence credit the corpus must carry, or None)}.
    """
    manifest = read_manifest(corpus_dir)
    labels = [c for c in manifest.columns if c.startswith(LABEL_PREFIX)]
    regions = [c for c in manifest.columns if c.startswith(REGION_PREFIX)]
    counted = [c for c in _COUNTED if c in manifest.columns]
    by: dict[str, Counter[str]] = {c: Counter() for c in _COUNTED}
    sizes: Counter[tuple[int, int]] = Counter()
    dtypes: Counter[str] = Counter()
    positives = dict.fromkeys(labels, 0)
    known = dict.fromkeys(["report", *regions], 0)
    rows = 0
    for path in _existing_shards(corpus_dir, manifest):
        shard = pq.ParquetFile(path)
        # Non-null counts from the footer when every row group has them; else read the column.
        nulls = {c: _footer_null_count(shard, c) for c in known}
        from_footer = {c for c, count in nulls.items() if count is not None}
        for column in from_footer:
            known[column] += shard.metadata.num_rows - (nulls[column] or 0)
        read = ["height", "width", "dtype", *counted, *labels, *(set(known) - from_footer)]
        read = [c for c in read if c in shard.schema_arrow.names]
        for batch in shard.iter_batches(batch_size=_BATCH_ROWS, columns=read):
            rows += batch.num_rows
            height = batch.column("height").to_numpy(zero_copy_only=False).astype(np.int64)
            width = batch.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
            keys, counts = np.unique(height << 32 | width, return_counts=True)
            sizes.update(
                {
                    (int(k >> 32), int(k & 0xFFFF_FFFF)): int(n)
                    for k, n in zip(keys, counts, strict=True)
                }
            )
            dtypes.update(_value_counts(batch.column("dtype")))
            for name in counted:
                by[name].update(_value_counts(batch.column(name)))
            for name in labels:
                positives[name] += int(pc.sum(batch.column(name)).as_py() or 0)
            for name in set(known) - from_footer:
                if name in batch.schema.names:
                    column = batch.column(name)
                    known[name] += len(column) - column.null_count
    for name in _COUNTED:
        if name not in counted:  # an older corpus without the column: every row is unknown
            by[name][UNKNOWN] = rows
    return {
        "rows": rows,
        "shards": len(manifest.shards),
        "image_size": _image_size(sizes),
        "bit_depth": _bit_depth(dtypes),
        **{f"by_{name}": _most_common(by[name]) for name in _COUNTED},
        "labels": positives,
        "regions": {name: known[name] for name in regions},
        "with_report": known["report"],
        "attribution": manifest.made_by.get("attribution") or None,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """`corpus_stats` as a plain-text table: counts with their share of all rows."""
    rows = stats["rows"]
    size, depth = stats["image_size"], stats["bit_depth"]
    size_text = (
        f"{size}x{size} px" if isinstance(size, int) else _inline(size) if size else "no images"
    )
    depth_text = f"{depth}-bit" if isinstance(depth, int) else _inline(depth) if depth else ""
    shards = f"{stats['shards']} shard{'s' if stats['shards'] != 1 else ''}"
    lines = [
        f"corpus   {rows:,} images in {shards} · {size_text}"
        + (f" · {depth_text}" if depth_text else ""),
        f"reports  {_count(stats['with_report'], rows)}",
    ]
    if stats.get("attribution"):
        lines += textwrap.wrap(
            f"credit   {stats['attribution']}", width=96, subsequent_indent=" " * 9
        )
    sections: list[tuple[str, dict[str, int]]] = [
        (name, stats[f"by_{name}"]) for name in _COUNTED if f"by_{name}" in stats
    ]
    if stats["labels"]:
        sections.append(("labels (positives)", stats["labels"]))
    if stats.get("regions"):
        sections.append(("regions (with a box)", stats["regions"]))
    width = max([len(k) for _, counts in sections for k in counts] + [8])
    for title, counts in sections:
        lines += ["", title]
        lines += [f"  {key:<{width}}  {_count(n, rows)}" for key, n in counts.items()]
    return "\n".join(lines)


def _existing_shards(corpus_dir: str | os.PathLike, manifest: Manifest) -> list[str]:
    paths = shard_paths(corpus_dir)
    for path, shard in zip(paths, manifest.shards, strict=True):
        if not Path(path).is_file():
            raise CorpusError(f"{corpus_dir}: shard {shard.path} is missing")
    return paths


def _footer_null_count(shard: pq.ParquetFile, column: str) -> int | None:
    """Nulls in `column` summed over the row-group statistics; None where any is missing."""
    names = shard.schema_arrow.names
    if column not in names:
        return None
    # A list column (region_*) has a nested leaf, so find the column chunk by its top name.
    leaves = [
        i
        for i in range(shard.metadata.num_columns)
        if shard.schema.column(i).path.split(".")[0] == column
    ]
    if len(leaves) != 1 or shard.schema.column(leaves[0]).max_repetition_level > 0:
        return None  # nested: leaf null counts count list elements, not rows
    total = 0
    for g in range(shard.metadata.num_row_groups):
        stats = shard.metadata.row_group(g).column(leaves[0]).statistics
        if stats is None or not stats.has_null_count:
            return None
        total += stats.null_count
    return total


def _value_counts(column: pa.Array | pa.ChunkedArray) -> Counter[str]:
    counts = pc.value_counts(column)
    values = counts.field("values").to_pylist()
    return Counter(
        {
            UNKNOWN if v is None else str(v): int(n)
            for v, n in zip(values, counts.field("counts"), strict=True)
        }
    )


def _most_common(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0] == UNKNOWN, kv[0])))


def _image_size(sizes: Counter[tuple[int, int]]) -> int | dict[str, int] | None:
    if not sizes:
        return None
    if len(sizes) == 1:
        ((height, width),) = sizes
        if height == width:
            return height
    return {f"{h}x{w}": n for (h, w), n in sorted(sizes.items(), key=lambda kv: -kv[1])}


def _bit_depth(dtypes: Counter[str]) -> int | dict[str, int] | None:
    if not dtypes:
        return None
    if len(dtypes) == 1:
        return {"uint8": 8, "uint16": 16}.get(next(iter(dtypes))) or dict(dtypes)
    return _most_common(dtypes)


def _count(n: int, total: int) -> str:
    share = f"{100 * n / total:5.1f}%" if total else "    -"
    return f"{n:>10,}  {share}"


def _inline(counts: dict[str, int], limit: int = 3) -> str:
    shown = ", ".join(f"{k} ({n:,})" for k, n in list(counts.items())[:limit])
    more = len(counts) - limit
    return shown + (f", {more} more" if more > 0 else "")


# -- contact sheet ----------------------------------------------------------------------------


def contact_sheet(
    corpus_dir: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    n: int = 64,
    seed: int = 0,
    columns: int = 8,
) -> Path:
    """Save a grid of `n` random images (all of them when the corpus has fewer) as a PNG.

    The same corpus and seed give the same bytes. Each tile is titled with its view, anatomy
    and split where known and its short image_id; the footer names the sample and carries the
    corpus's attribution (`made_by["attribution"]`), which licences such as CC BY require on
    any derived picture; the PNG's Description field repeats the footer. The sheet is
    `columns * TILE_PX` pixels wide and `sheet_height(...)` tall.
    """
    from matplotlib.figure import Figure

    if n < 1 or columns < 1:
        raise ValueError(f"contact_sheet: n and columns must be >= 1, got n={n}, columns={columns}")
    manifest = read_manifest(corpus_dir)
    paths = _existing_shards(corpus_dir, manifest)
    picks = np.random.default_rng(seed).permutation(manifest.rows)[:n]
    tiles = _read_tiles(paths, [int(i) for i in picks])
    width_px = columns * TILE_PX
    caption = sheet_caption(manifest, shown=len(tiles), seed=seed, width_px=width_px)
    height_px = sheet_height(len(tiles), columns=columns, caption_lines=len(caption))

    fig = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI, facecolor=_BACKGROUND)
    cell_h = TILE_PX + LABEL_PX
    pad = 4
    for i, tile in enumerate(tiles):
        row, col = divmod(i, columns)
        left, top = col * TILE_PX, row * cell_h
        fig.text(
            (left + TILE_PX / 2) / width_px,
            1 - (top + 3) / height_px,
            tile["title"],
            color=_TEXT,
            fontsize=7.5,
            ha="center",
            va="top",
        )
        fig.text(
            (left + TILE_PX / 2) / width_px,
            1 - (top + 16) / height_px,
            tile["id"],
            color=_DIM,
            fontsize=6.5,
            family="monospace",
            ha="center",
            va="top",
        )
        side = TILE_PX - 2 * pad
        ax = fig.add_axes(
            (
                (left + pad) / width_px,
                1 - (top + LABEL_PX + pad + side) / height_px,
                side / width_px,
                side / height_px,
            )
        )
        ax.imshow(_fit(tile["image"], side), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_axis_off()
    footer_top = -(-len(tiles) // columns) * cell_h + FOOTER_PAD_PX / 2
    for j, line in enumerate(caption):
        fig.text(
            8 / width_px,
            1 - (footer_top + j * FOOTER_LINE_PX) / height_px,
            line,
            color=_TEXT if j else _DIM,
            fontsize=8,
            ha="left",
            va="top",
        )
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" entry: the bytes then depend on the corpus and seed, not on matplotlib.
    fig.savefig(out, dpi=_DPI, metadata={"Software": None, "Description": " ".join(caption)})
    return out


def sheet_caption(manifest: Manifest, *, shown: int, seed: int, width_px: int) -> list[str]:
    """Footer lines: what the sample is, then the attribution wrapped to the sheet's width."""
    command = manifest.made_by.get("command") or "corpus"
    lines = [f"{shown:,} of {manifest.rows:,} images, seed {seed} · raydiology {command}"]
    attribution = manifest.made_by.get("attribution")
    if attribution:
        lines += textwrap.wrap(str(attribution), width=max(24, width_px // 6))
    return lines


def sheet_height(tiles: int, *, columns: int, caption_lines: int) -> int:
    """Pixel height of a contact sheet with `tiles` images and a footer of that many lines."""
    return (
        -(-tiles // columns) * (TILE_PX + LABEL_PX)
        + caption_lines * FOOTER_LINE_PX
        + (FOOTER_PAD_PX)
    )


def _read_tiles(paths: list[str], picks: list[int]) -> list[dict[str, Any]]:
    """The picked global row numbers, in pick order, reading only their row groups."""
    starts: list[tuple[int, str, int]] = []  # (first global row, shard, row group)
    offset = 0
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            starts.append((offset, path, g))
            offset += meta.row_group(g).num_rows
    firsts = [s[0] for s in starts]
    wanted: dict[int, list[int]] = {}  # index into starts -> global rows
    for row in picks:
        wanted.setdefault(int(np.searchsorted(firsts, row, side="right")) - 1, []).append(row)
    columns = ["image_id", "pixels", "height", "width", "dtype", "view", "anatomy", "split"]
    found: dict[int, dict[str, Any]] = {}
    for k, rows in sorted(wanted.items()):
        first, path, group = starts[k]
        shard = pq.ParquetFile(path)
        present = [c for c in columns if c in shard.schema_arrow.names]
        table = shard.read_row_group(group, columns=present)
        for row in rows:
            record = table.slice(row - first, 1).to_pylist()[0]
            found[row] = _tile(record)
    return [found[row] for row in picks]


def _tile(record: dict[str, Any]) -> dict[str, Any]:
    dtype = np.dtype("<u1" if record["dtype"] == "uint8" else "<u2")
    image = np.frombuffer(record["pixels"], dtype=dtype).reshape(record["height"], record["width"])
    known = [str(record[c]) for c in ("view", "anatomy", "split") if record.get(c) is not None]
    title = " · ".join(_short(k, 12) for k in known) or UNKNOWN
    return {"image": image, "title": title, "id": _short(record["image_id"], 16)}


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fit(image: np.ndarray, side: int) -> np.ndarray:
    """Scale to 0..1 and shrink so the longer edge is `side` pixels (keeps the aspect ratio)."""
    values = image.astype(np.float32)
    if image.dtype == np.uint8:
        values /= 255.0
    else:  # 16-bit radiographs often use 10-12 bits: stretch each to its own range
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    height, width = values.shape
    scale = side / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        values = np.asarray(Image.fromarray(values).resize(size, Image.Resampling.BOX))
    return values
