"""Corpus format v1: Parquet shards of raw pixel arrays plus a `manifest.json`.

Pixels are stored decoded (raw little-endian bytes, already resized and padded) because PNG or
JPEG decoding at 1280² is the slowest step of a training input pipeline; with raw bytes the
pipeline does one `np.frombuffer` per batch. The manifest pins every shard's sha256 so a run
can record exactly which data it saw (`manifest_hash`) and `verify_corpus` can catch a
truncated copy before hours of training. See docs/corpus_format.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
T = TypeVar("T")
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"

# Optional string columns: missing values stay null, never guessed. `study_id` names the
# study an image belongs to (the views of one exam share it, and their report).
# `findings` and `impression` are the report's sections where its source has them (the
# report column then holds both), for protocols that score one section.
METADATA_COLUMNS = (
    "report", "view", "sex", "age_group", "anatomy", "split", "modality", "manufacturer",
    "study_id", "findings", "impression",
)  # fmt: skip
# Unique-ish text: a dictionary would only grow the file.
_PLAIN_COLUMNS = ("report", "study_id", "findings", "impression")
LABEL_PREFIX = "label_"
# Optional per-image boxes (top, left, bottom, right), normalised to the stored image, e.g.
# `region_chest` for context-aware masking; null where unknown.
REGION_PREFIX = "region_"
# Optional per-image segmentation masks, one column per class (`mask_lungs`, ...): raw uint8
# 0/1 bytes of the stored image's height x width (like `pixels`, no decode per epoch); null
# where the class was not annotated for that image.
MASK_PREFIX = "mask_"
# Optional per-image box list (detection / grounding): a JSON list of
# [x0, y0, x1, y1, label] or [x0, y0, x1, y1, label, phrase] in stored-image pixels (x right,
# y down, x1/y1 exclusive edges); "[]" = annotated, nothing there; null = not annotated.
BOXES_COLUMN = "boxes"

_BASE_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("pixels", pa.binary(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),
    *(pa.field(name, pa.string()) for name in METADATA_COLUMNS),
]
_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2")}
# Pixels are decompressed every epoch, so they get LZ4, which decodes at about memory speed
# yet still shrinks the zero padding and dark background; everything else is small and takes
# zstd. docs/corpus_format.md has the measurement behind this choice.
_PIXELS_COMPRESSION = "lz4"
_OTHER_COMPRESSION = "zstd"


class CorpusError(ValueError):
    """A corpus on disk is missing, malformed or does not match its manifest."""


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    path: str  # relative to the corpus folder, POSIX separators
    rows: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    schema_version: int
    rows: int
    shards: tuple[ShardInfo, ...]
    image_size: int | None  # stored side when every image is the same square
    dtype: str | None  # "uint8"/"uint16" when uniform
    columns: dict[str, str]  # column name -> arrow type string
    label_columns: tuple[str, ...]
    made_by: dict

    @property
    def mask_columns(self) -> tuple[str, ...]:
        """The `mask_*` columns, in schema order (derived: the manifest JSON is unchanged)."""
        return tuple(c for c in self.columns if c.startswith(MASK_PREFIX))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "rows": self.rows,
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "image_size": self.image_size,
            "dtype": self.dtype,
            "columns": dict(self.columns),
            "label_columns": list(self.label_columns),
            "made_by": self.made_by,
        }


def _version() -> str:
    try:
        return metadata.version("raydiology")
    except metadata.PackageNotFoundError:
        return "unknown"


def corpus_schema(
    label_columns: Iterable[str] = (),
    region_columns: Iterable[str] = (),
    mask_columns: Iterable[str] = (),
    boxes: bool = False,
) -> pa.Schema:
    """The shard schema: base columns, then `label_*` (int8 0/1), `region_*` boxes,
    `mask_*` (binary, like pixels), then the `boxes` list (JSON text) when asked for."""
    return pa.schema(
        _BASE_FIELDS
        + [pa.field(name, pa.int8()) for name in label_columns]
        + [pa.field(name, pa.list_(pa.float32(), 4)) for name in region_columns]
        + [pa.field(name, pa.binary()) for name in mask_columns]
        + ([pa.field(BOXES_COLUMN, pa.string())] if boxes else [])
    )


def shard_file(out_dir: str | os.PathLike, index: int) -> Path:
    """Where shard `index` of a corpus lives."""
    return Path(out_dir) / SHARDS_DIR / f"part-{index:05d}.parquet"


def plan_shards(
    rows: Iterable[tuple[int, str | None]],
    *,
    shard_rows: int = 1024,
    row_group_rows: int = 128,
    row_group_bytes: int = 32 << 20,
) -> list[list[int]]:
    """Row-group sizes of each shard that `CorpusWriter` would write for these rows, given
    as (pixel bytes, study_id) in order. With this layout, shards can be written apart (one
    `write_shard` call each, e.g. in parallel Ray tasks) and still equal a streamed corpus."""
    shards: list[list[int]] = []
    groups: list[int] = []
    buffered = buffered_bytes = written = 0
    last: str | None = None
    for size, study in rows:
        if _closes_group(
            buffered,
            buffered_bytes,
            last,
            study,
            room=shard_rows - written,
            row_group_rows=row_group_rows,
            row_group_bytes=row_group_bytes,
        ):
            groups.append(buffered)
            written += buffered
            buffered = buffered_bytes = 0
            if written >= shard_rows:
                shards.append(groups)
                groups, written = [], 0
        buffered += 1
        buffered_bytes += size
        last = study
    if buffered:
        groups.append(buffered)
    if groups:
        shards.append(groups)
    return shards


def write_shard(
    out_dir: str | os.PathLike, index: int, row_groups: Iterable[pa.Table], *, schema: pa.Schema
) -> ShardInfo:
    """Write shard `index`, one row group per table (cut as `plan_shards` says), in the
    layout and encodings `CorpusWriter` uses. The file takes its final name only once
    complete; the returned `ShardInfo` goes to `write_manifest`."""
    final = shard_file(out_dir, index)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(final) + ".tmp")
    rows = 0
    try:
        with _parquet_writer(tmp, schema) as writer:
            for group in row_groups:
                writer.write_table(group, row_group_size=max(group.num_rows, 1))
                rows += group.num_rows
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _publish_shard(Path(out_dir), tmp, final, rows)


def write_manifest(
    out_dir: str | os.PathLike,
    shards: Iterable[ShardInfo],
    *,
    schema: pa.Schema,
    sizes: Iterable[tuple[int, int]],
    dtypes: Iterable[str],
    made_by: dict,
) -> Manifest:
    """Write `manifest.json` for shards already in place, via a temp file and rename so that
    it appears last and whole; `sizes` and `dtypes` are the (height, width) pairs and pixel
    dtypes found in the shards."""
    shards = tuple(shards)
    sizes, dtypes = set(sizes), set(dtypes)
    size = None
    if len(sizes) == 1:
        height, width = next(iter(sizes))
        size = height if height == width else None
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        rows=sum(s.rows for s in shards),
        shards=shards,
        image_size=size,
        dtype=next(iter(dtypes)) if len(dtypes) == 1 else None,
        columns={f.name: str(f.type) for f in schema},
        label_columns=tuple(f.name for f in schema if f.name.startswith(LABEL_PREFIX)),
        made_by={
            **_made_by(made_by),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    out = Path(out_dir)
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    return manifest


def _made_by(made_by: dict) -> dict:
    """Provenance as the manifest records it: tool, version, command, options, then extras."""
    return {
        "tool": "raydiology",
        "version": _version(),
        "command": made_by.get("command", ""),
        "options": dict(made_by.get("options", {})),
        **{k: v for k, v in made_by.items() if k not in ("command", "options", "tool", "version")},
    }


def _closes_group(
    rows: int,
    nbytes: int,
    last_study: str | None,
    study: str | None,
    *,
    room: int,
    row_group_rows: int,
    row_group_bytes: int,
) -> bool:
    """Whether the `rows` buffered rows (`nbytes` of pixels) form a finished row group before
    a row of `study` joins: at `row_group_rows` rows (fewer when the shard has only `room`
    left) or `row_group_bytes`, but never between two views of one study."""
    full = rows >= min(row_group_rows, room) or nbytes >= row_group_bytes
    return rows > 0 and full and (last_study is None or last_study != study)


def _parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        str(path),
        schema,
        compression={
            f.name: _PIXELS_COMPRESSION if f.name == "pixels" else _OTHER_COMPRESSION
            for f in schema
        },
        use_dictionary=[n for n in METADATA_COLUMNS if n not in _PLAIN_COLUMNS] + ["dtype"],
        # min/max of megabyte-sized blobs would only bloat the footer
        write_statistics=[f.name for f in schema if f.name != "pixels" and not _is_mask(f.name)],
    )


def _is_mask(name: str) -> bool:
    return name.startswith(MASK_PREFIX)


def _publish_shard(out_dir: Path, tmp: Path, final: Path, rows: int) -> ShardInfo:
    os.replace(tmp, final)
    return ShardInfo(
        path=final.relative_to(out_dir).as_posix(), rows=rows, sha256=file_sha256(final)
    )


class CorpusWriter:
    """Streams rows into shards of `shard_rows`, each written in row groups of at most
    `row_group_rows` rows and about `row_group_bytes` of pixels, so that at most one row group
    is held in memory and the pipeline, which reads one row group per task, gets units of
    work that are neither tiny (256 px) nor hundreds of megabytes (1280 px).

    Consecutive rows that share a `study_id` stay in one row group (it closes at the first
    row of the next study, so it may exceed `row_group_rows` by a study's views less one):
    the pipeline groups views per row group, and a study cut in two would become two samples.

    Use as a context manager: a clean exit calls `close()`; an exception leaves no manifest,
    so a half-written corpus can never pass `read_manifest`.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        made_by: dict,
        shard_rows: int = 1024,
        row_group_rows: int = 128,
        row_group_bytes: int = 32 << 20,
    ) -> None:
        if shard_rows < 1 or row_group_rows < 1:
            raise ValueError("shard_rows and row_group_rows must be >= 1")
        self.out_dir = Path(out_dir)
        if (self.out_dir / MANIFEST_NAME).exists() or any(
            (self.out_dir / SHARDS_DIR).glob("*.parquet")
        ):
            raise CorpusError(f"{self.out_dir}: already holds a corpus; choose an empty folder")
        (self.out_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        self.made_by = _made_by(made_by)
        self.shard_rows = shard_rows
        self.row_group_rows = row_group_rows
        self.row_group_bytes = row_group_bytes
        self._buffered_bytes = 0
        self._schema: pa.Schema | None = None
        self._label_columns: tuple[str, ...] = ()
        self._region_columns: tuple[str, ...] = ()
        self._mask_columns: tuple[str, ...] = ()
        self._boxes = False
        self._buffer: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._shard_written = 0  # rows in the open shard
        self._shards: list[ShardInfo] = []
        self._ids: set[str] = set()
        self._sizes: set[tuple[int, int]] = set()
        self._dtypes: set[str] = set()
        self._closed = False
        self.manifest: Manifest | None = None  # set by close()

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def add(self, row: dict) -> None:
        """Queue one image; `pixels` is a 2-D uint8/uint16 array, `label_*` are 0/1, `mask_*`
        are 2-D arrays of the pixels' shape (nonzero = inside) or None, `boxes` a box list
        (`check_boxes`) or None."""
        if self._closed:
            raise CorpusError(f"{self.out_dir}: writer is closed")
        image_id = row.get("image_id")
        if not isinstance(image_id, str) or not image_id:
            raise CorpusError(f"{self.out_dir}: row without a string image_id: {image_id!r}")
        if image_id in self._ids:
            raise CorpusError(f"{self.out_dir}: duplicate image_id {image_id!r}")
        pixels = row.get("pixels")
        if not isinstance(pixels, np.ndarray) or pixels.ndim != 2:
            raise CorpusError(f"{self.out_dir}: {image_id}: pixels must be a 2-D numpy array")
        dtype = pixels.dtype.name
        if dtype not in _DTYPES:
            raise CorpusError(f"{self.out_dir}: {image_id}: pixels dtype {dtype} not uint8/uint16")
        height, width = pixels.shape
        for key, want in (("height", height), ("width", width), ("dtype", dtype)):
            if key in row and row[key] != want:
                raise CorpusError(
                    f"{self.out_dir}: {image_id}: {key}={row[key]!r}, pixels say {want!r}"
                )

        labels = tuple(k for k in row if k.startswith(LABEL_PREFIX))
        regions = tuple(k for k in row if k.startswith(REGION_PREFIX))
        masks = tuple(k for k in row if _is_mask(k))
        unknown = set(row) - {"image_id", "pixels", "height", "width", "dtype"}
        unknown -= set(METADATA_COLUMNS) | set(labels) | set(regions) | set(masks)
        unknown -= {BOXES_COLUMN}
        if unknown:
            raise CorpusError(f"{self.out_dir}: {image_id}: unknown column {sorted(unknown)[0]!r}")
        if self._schema is None:
            self._label_columns = labels
            self._region_columns = regions
            self._mask_columns = masks
            self._boxes = BOXES_COLUMN in row
            self._schema = corpus_schema(labels, regions, masks, self._boxes)
        else:
            if (BOXES_COLUMN in row) != self._boxes:
                raise CorpusError(f"{self.out_dir}: {image_id}: boxes column differs from the "
                                  "first row's")  # fmt: skip
            for kind, got, first in (
                ("label", labels, self._label_columns),
                ("region", regions, self._region_columns),
                ("mask", masks, self._mask_columns),
            ):
                if set(got) != set(first):
                    raise CorpusError(
                        f"{self.out_dir}: {image_id}: {kind} columns {sorted(got)} differ from "
                        f"the first row's {sorted(first)}"
                    )

        out = {
            "image_id": image_id,
            "pixels": np.ascontiguousarray(pixels, dtype=_DTYPES[dtype]).tobytes(),
            "height": height,
            "width": width,
            "dtype": dtype,
        }
        for name in METADATA_COLUMNS:
            value = row.get(name)
            out[name] = None if value is None else str(value)
        for name in self._label_columns:
            value = row[name]
            if value not in (0, 1):  # also accepts bools and numpy ints
                raise CorpusError(f"{self.out_dir}: {image_id}: {name}={value!r} is not 0/1")
            out[name] = int(value)
        for name in self._region_columns:
            out[name] = _check_box(row[name], f"{self.out_dir}: {image_id}: {name}")
        for name in self._mask_columns:
            out[name] = _mask_bytes(row[name], pixels.shape, f"{self.out_dir}: {image_id}: {name}")
        if self._boxes:
            value = row[BOXES_COLUMN]
            boxes = check_boxes(value, (height, width), f"{self.out_dir}: {image_id}: boxes")
            out[BOXES_COLUMN] = None if boxes is None else json.dumps(boxes)

        if _closes_group(
            len(self._buffer),
            self._buffered_bytes,
            self._buffer[-1]["study_id"] if self._buffer else None,
            out["study_id"],
            room=self.shard_rows - self._shard_written,
            row_group_rows=self.row_group_rows,
            row_group_bytes=self.row_group_bytes,
        ):
            self._flush()
        self._ids.add(image_id)
        self._sizes.add((height, width))
        self._dtypes.add(dtype)
        self._buffer.append(out)
        self._buffered_bytes += len(out["pixels"])

    def close(self) -> Manifest:
        """Write the last shard, then `manifest.json` via a temp file and rename."""
        if self._closed:
            raise CorpusError(f"{self.out_dir}: writer is closed")
        if self._buffer:
            self._flush()
        self._finish_shard()
        self._closed = True
        self.manifest = write_manifest(
            self.out_dir,
            self._shards,
            schema=self._schema or corpus_schema(),
            sizes=self._sizes,
            dtypes=self._dtypes,
            made_by=self.made_by,
        )
        return self.manifest

    # -- internals -----------------------------------------------------------------------

    def _shard_path(self) -> Path:
        return shard_file(self.out_dir, len(self._shards))

    def _flush(self) -> None:
        assert self._schema is not None
        if self._writer is None:
            self._writer = _parquet_writer(Path(str(self._shard_path()) + ".tmp"), self._schema)
        table = pa.Table.from_pylist(self._buffer, schema=self._schema)
        self._writer.write_table(table, row_group_size=len(self._buffer))
        self._shard_written += len(self._buffer)
        self._buffer = []
        self._buffered_bytes = 0
        if self._shard_written >= self.shard_rows:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        final = self._shard_path()
        tmp = Path(str(final) + ".tmp")
        self._shards.append(_publish_shard(self.out_dir, tmp, final, self._shard_written))
        self._shard_written = 0

    def _abort(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            Path(str(self._shard_path()) + ".tmp").unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 8 MiB chunks (shards and checkpoint files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(corpus_dir: str | os.PathLike) -> Manifest:
    """Parse and check `manifest.json`; errors name the corpus path and the bad key."""
    path = Path(corpus_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorpusError(f"{path}: no manifest; is {corpus_dir} a raydiology corpus?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(data, dict):
        raise CorpusError(f"{path}: manifest is not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CorpusError(
            f"{path}: schema_version {version!r} is not supported (this raydiology reads "
            f"{SCHEMA_VERSION})"
        )
    try:
        shards = tuple(
            ShardInfo(path=str(s["path"]), rows=int(s["rows"]), sha256=str(s["sha256"]))
            for s in data["shards"]
        )
        manifest = Manifest(
            schema_version=version,
            rows=int(data["rows"]),
            shards=shards,
            image_size=data.get("image_size"),
            dtype=data.get("dtype"),
            columns=dict(data["columns"]),
            label_columns=tuple(data.get("label_columns", ())),
            made_by=dict(data.get("made_by", {})),
        )
    except KeyError as e:
        raise CorpusError(f"{path}: manifest lacks key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CorpusError(f"{path}: malformed manifest: {e}") from None
    if manifest.rows != sum(s.rows for s in shards):
        raise CorpusError(
            f"{path}: rows={manifest.rows} but the shards hold {sum(s.rows for s in shards)}"
        )
    return manifest


def verify_corpus(corpus_dir: str | os.PathLike, *, progress: bool = False) -> Manifest:
    """Check every shard against the manifest: present, its sha256 as recorded, and readable
    by pyarrow row group by row group, with the recorded rows, columns and pixel lengths.
    Reads all bytes twice (hash, then decode). Raises CorpusError naming every bad shard,
    one per line, after checking all of them."""
    manifest = read_manifest(corpus_dir)
    root = Path(corpus_dir)
    problems = []
    shards = progress_iter(manifest.shards, enabled=progress, description="verifying shards",
                           total=len(manifest.shards))  # fmt: skip
    for shard in shards:
        found = _shard_problems(root / shard.path, shard, manifest)
        if found:
            problems.append(f"shard {shard.path}: {'; '.join(found)}")
    if problems:
        raise CorpusError(
            f"{corpus_dir}: {len(problems)} of {len(manifest.shards)} shard(s) bad:\n  "
            + "\n  ".join(problems)
        )
    return manifest


def _shard_problems(path: Path, shard: ShardInfo, manifest: Manifest) -> list[str]:
    """What is wrong with one shard (nothing: an empty list)."""
    if not path.is_file():
        return ["is missing"]
    problems = []
    actual = file_sha256(path)
    if actual != shard.sha256:
        problems.append(
            f"has sha256 {actual[:12]}…, manifest says {shard.sha256[:12]}…; the file changed "
            "or was copied incompletely"
        )
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged footer
        return [*problems, f"unreadable Parquet footer ({type(e).__name__}: {e})"]
    names = file.schema_arrow.names
    if names != list(manifest.columns):
        problems.append(f"columns {names} differ from the manifest's {list(manifest.columns)}")
    if file.metadata.num_rows != shard.rows:
        problems.append(f"holds {file.metadata.num_rows} rows, manifest says {shard.rows}")
    for group in range(file.num_row_groups):
        try:
            table = file.read_row_group(group)
            if "pixels" in names:
                _check_pixel_lengths(table)
        except Exception as e:  # a decode error of any kind means the shard is bad
            problems.append(f"row group {group} unreadable ({type(e).__name__}: {e})")
    return problems


def _check_pixel_lengths(table: pa.Table) -> None:
    """Every pixels blob holds height * width values of its dtype."""
    import pyarrow.compute as pc

    itemsize = np.array([_DTYPES[d].itemsize if d in _DTYPES else 0
                         for d in table.column("dtype").to_pylist()])  # fmt: skip
    want = table.column("height").to_numpy() * table.column("width").to_numpy() * itemsize
    got = pc.binary_length(table.column("pixels")).to_numpy()
    bad = np.flatnonzero(got != want)
    if len(bad):
        image_id = table.column("image_id")[int(bad[0])].as_py()
        raise CorpusError(f"{image_id}: pixels hold {got[bad[0]]} bytes, not {want[bad[0]]}")


def shard_paths(corpus_dir: str | os.PathLike) -> list[str]:
    """Absolute shard paths in manifest order (what `ray.data.read_parquet` is given)."""
    root = Path(corpus_dir).resolve()
    return [str(root / s.path) for s in read_manifest(corpus_dir).shards]


def manifest_hash(corpus_dir: str | os.PathLike) -> str:
    """sha256 of the manifest bytes: one string that names the exact data a run used."""
    path = Path(corpus_dir) / MANIFEST_NAME
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise CorpusError(f"{path}: no manifest") from None


def decode_pixels(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Turn a column batch (Ray Data's numpy format) into one [B, H, W] uint8/uint16 array.

    All rows must share height, width and dtype, which is what lets the whole batch be one
    `np.frombuffer` over the joined bytes instead of B small decodes. The result is read-only
    (it views an immutable bytes object); copy or convert before writing into it.
    """
    pixels = batch["pixels"]
    n = len(pixels)
    if n == 0:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    heights = np.asarray(batch["height"])
    widths = np.asarray(batch["width"])
    dtypes = np.asarray(batch["dtype"]).astype(str)
    ids = batch.get("image_id")
    differs = (heights != heights[0]) | (widths != widths[0]) | (dtypes != dtypes[0])
    if differs.any():
        i = int(np.argmax(differs))
        who = ids[i] if ids is not None else f"row {i}"
        first = ids[0] if ids is not None else "row 0"
        raise CorpusError(
            f"decode_pixels: {who} is {heights[i]}x{widths[i]} {dtypes[i]}, but {first} is "
            f"{heights[0]}x{widths[0]} {dtypes[0]}; a batch must share one size and dtype"
        )
    height, width, name = int(heights[0]), int(widths[0]), str(dtypes[0])
    if name not in _DTYPES:
        raise CorpusError(f"decode_pixels: dtype {name!r} is not uint8/uint16")
    dtype = _DTYPES[name]
    if isinstance(pixels, np.ndarray) and pixels.ndim == 2:  # [B, nbytes] (column_arrays)
        flat = pixels.reshape(-1).view(dtype)
    else:
        flat = np.frombuffer(b"".join(pixels), dtype=dtype)
    if flat.size != n * height * width:
        raise CorpusError(
            f"decode_pixels: {flat.size} values for {n} images of {height}x{width}; "
            "a pixels blob has the wrong length"
        )
    out = flat.reshape(n, height, width)
    return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))


def read_rows(corpus_dir: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Whole corpus as one Arrow table; meant for tests and small evaluation corpora."""
    manifest = read_manifest(corpus_dir)
    paths = shard_paths(corpus_dir)
    if not paths:
        schema = pa.schema([pa.field(k, pa.type_for_alias(v)) for k, v in manifest.columns.items()])
        empty = schema.empty_table()
        return empty.select(columns) if columns is not None else empty
    for path, shard in zip(paths, manifest.shards, strict=True):
        if not Path(path).is_file():
            raise CorpusError(f"{corpus_dir}: shard {shard.path} is missing")
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in paths)


def progress_iter(
    items: Iterable[T], *, enabled: bool, description: str, total: int | None = None
) -> Iterator[T]:
    """Iterate with a rich progress bar when `enabled`, silently otherwise (tests, workers)."""
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, total=total)


def _mask_bytes(value: object, shape: tuple[int, ...], where: str) -> bytes | None:
    """A mask as stored: uint8 0/1 bytes of the image's shape, or None (not annotated)."""
    if value is None:
        return None
    mask = np.asarray(value)
    if mask.shape != shape:
        raise CorpusError(f"{where}: mask of shape {mask.shape}, the image is {shape}")
    return np.ascontiguousarray(mask != 0, dtype=np.uint8).tobytes()


def decode_masks(
    batch: dict[str, np.ndarray], columns: Iterable[str], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """`mask_*` column blobs -> (masks [B, K, H, W] uint8 0/1, known [B, K] bool); an
    unannotated (null) mask is all zeros with known False. Every row has `shape`."""
    columns = list(columns)
    n = len(batch["image_id"])
    masks = np.zeros((n, len(columns), *shape), dtype=np.uint8)
    known = np.zeros((n, len(columns)), dtype=bool)
    for k, name in enumerate(columns):
        for i, blob in enumerate(batch[name]):
            if blob is None:
                continue
            flat = np.frombuffer(bytes(blob), dtype=np.uint8)
            if flat.size != shape[0] * shape[1]:
                raise CorpusError(f"{name}: {flat.size} bytes, not {shape[0]}x{shape[1]}")
            masks[i, k] = flat.reshape(shape)
            known[i, k] = True
    return masks, known


def _check_box(value: object, where: str) -> list[float] | None:
    """A normalised (top, left, bottom, right) box, or None where the region is unknown."""
    if value is None:
        return None
    box = [float(v) for v in np.asarray(value, dtype=np.float64).ravel()]
    if len(box) != 4:
        raise CorpusError(f"{where}: {value!r} is not 4 numbers (top, left, bottom, right)")
    top, left, bottom, right = box
    if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
        raise CorpusError(f"{where}: {box} is not a box inside [0, 1] x [0, 1]")
    return box


def check_boxes(
    value: object, shape: tuple[int, int], where: str
) -> list[list[float | str]] | None:
    """A box list (JSON text or a list of [x0, y0, x1, y1, label(, phrase)]) checked against
    an image of `shape` (height, width) -> the list with float coordinates; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
        try:
            value = json.loads(text)
        except ValueError:
            raise CorpusError(f"{where}: not JSON: {text[:80]!r}") from None
    if not isinstance(value, list):
        raise CorpusError(f"{where}: a box list must be a JSON list, not {type(value).__name__}")
    height, width = shape
    out: list[list[float | str]] = []
    for box in value:
        if not isinstance(box, (list, tuple)) or len(box) not in (5, 6):
            raise CorpusError(f"{where}: {box!r} is not [x0, y0, x1, y1, label(, phrase)]")
        try:
            x0, y0, x1, y1 = (float(v) for v in box[:4])
        except (TypeError, ValueError):
            raise CorpusError(f"{where}: {box!r}: coordinates must be numbers") from None
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise CorpusError(f"{where}: {box!r} is not a box inside the {width}x{height} image")
        if not all(isinstance(t, str) and t for t in box[4:]):
            raise CorpusError(f"{where}: {box!r}: label and phrase must be non-empty text")
        out.append([x0, y0, x1, y1, *(str(t) for t in box[4:])])
    return out
