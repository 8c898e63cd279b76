"""Ingest: folders of DICOM/PNG/JPEG and CSV file lists -> a clean corpus (format v1).

Three stages, so that a million-image hospital export is processed in parallel, survives a
crash, and is deduplicated across all of it:

1. decode (parallel, Ray tasks when Ray is up): the files are put in a seeded random order
   that keeps each study's views together (so a row group mixes patients and series instead
   of holding one folder), then each chunk of files is loaded (DICOM or PIL), converted to
   the corpus bit depth, resized, hashed (content sha256 + perceptual hash) and written to
   `staging/chunk-NNNNN.parquet`; a finished chunk has a `.json` beside it, keyed by a digest
   of its exact files (path, name, size, mtime, position) and the options, and is skipped
   when the ingest runs again with the same files in the same place: a changed file list
   redoes the chunks it touches and never mixes old rows with new indices;
2. deduplicate (driver): exact duplicates by content hash, near duplicates by perceptual hash;
3. write (parallel like decoding): the driver plans the shards from light columns only (which
   kept row goes to which shard and row group, exactly as `CorpusWriter` would cut them, and
   the report columns joined by file name); each shard is then written by its own task
   straight from the staged Arrow tables, and a finished shard has `staging/shard-NNNNN.json`
   beside its chunks, so a re-run skips it. The manifest is written last, from the tasks'
   results (rows, sha256, sizes).

A bad file never stops an ingest: it goes to `quarantine.jsonl` with its reason, and
found == ingested + quarantined + duplicates. Nothing from a DICOM header but the few
metadata columns is kept, ids are salted hashes, and logs carry counts, never header values
or paths. Side files (`quarantine.jsonl`, `duplicates.jsonl`) name files by hashed ids and
carry scrubbed reasons; paths, and the mapping from ids back to files (`source_map.csv`),
are written only when asked for, because file names can identify patients. Without a salt,
PNG/JPEG ids can be recomputed from public file names (a warning), and DICOM input is
refused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydiology.data.corpus import (
    BOXES_COLUMN,
    LABEL_PREFIX,
    MANIFEST_NAME,
    MASK_PREFIX,
    METADATA_COLUMNS,
    SHARDS_DIR,
    CorpusError,
    Manifest,
    ShardInfo,
    check_boxes,
    corpus_schema,
    plan_shards,
    progress_iter,
    read_manifest,
    shard_file,
    write_manifest,
    write_shard,
)
from raydiology.data.errors import BadImage
from raydiology.data.images import (
    ResizeMode,
    check_clip_percentile,
    fit_square,
    load_image,
    to_bit_depth,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# Mask files in a mask folder (JSRT's SCR masks are GIFs)
MASK_SUFFIXES = (".png", ".gif", ".bmp", ".tif", ".tiff")
QUARANTINE_NAME = "quarantine.jsonl"
DUPLICATES_NAME = "duplicates.jsonl"
SOURCE_MAP_NAME = "source_map.csv"
STAGING_DIR = "staging"
DEFAULT_SHUFFLE_SEED = 0
SALT_HELP = (
    "set a secret in the environment variable RAYDIOLOGY_INGEST_SALT (or the one "
    "`raydiology ingest --salt-env NAME` names), or pass salt= to ingest_images"
)

if TYPE_CHECKING:
    from raydiology.data.reports import CleanStyle, ReportRecord

log = logging.getLogger("raydiology.ingest")


@dataclass(frozen=True, kw_only=True)
class IngestSummary:
    found: int
    ingested: int
    quarantined: int
    duplicates: int
    manifest: Manifest
    quarantine_file: str | None  # None when nothing was quarantined
    skipped_chunks: int = 0  # chunks already done by an earlier, interrupted run
    skipped_shards: int = 0  # shards already written by an earlier, interrupted run
    reasons: dict[str, int] = field(default_factory=dict)  # quarantine reason kind -> count


@dataclass(frozen=True, kw_only=True)
class IngestOptions:
    """What decides the stored pixels; a change means chunks must be decoded again."""

    size: int = 1024
    resize: ResizeMode = "pad"
    bit_depth: Literal[8, 16] = 8
    # perceptual-hash bits (dedup.DEFAULT_MAX_DISTANCE, measured); None = exact duplicates only
    near_duplicate_distance: int | None = 0
    allow_burned_in: bool = False  # keep DICOMs flagged BurnedInAnnotation YES
    clip_percentile: float | None = None  # intensity rule's optional clip (data/images.py)

    def fingerprint(self, salt: str) -> str:
        from raydiology.data.dedup import HASH_VERSION

        record = {**asdict(self), "salt": salt, "hash_version": HASH_VERSION}
        blob = json.dumps(record, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class SourceFile:
    path: str
    key: str  # path relative to its source root (or as listed in a CSV): names the image
    metadata: dict[str, Any] = field(default_factory=dict)  # from a CSV file list


# ----------------------------------------------------------------------------- sources


def find_sources(sources: list[str | Path]) -> list[SourceFile]:
    """Every image under `sources`, sorted for determinism.

    A source is a folder (searched recursively for PNG/JPEG/DICOM, including DICOM files
    without an extension or named by UID), a single image file, or a CSV file list with a
    `path` column (relative paths resolve against the CSV's folder) and optional metadata
    columns (report, view, sex, age_group, anatomy, split, study_id, label_*), mask_*
    columns of mask file paths (resolved like `path`; empty = not annotated) and a `boxes`
    column (a box list in the source image's pixels, docs/corpus_format.md).
    """
    from raydiology.data.dicom import is_dicom

    found: list[SourceFile] = []
    for source in sources:
        root = Path(source)
        if root.is_file() and root.suffix.lower() == ".csv":
            found += _read_file_list(root)
        elif root.is_file():
            found.append(SourceFile(str(root), root.name))
        elif root.is_dir():
            files = [
                p
                for p in root.rglob("*")
                if p.is_file()
                # PACS exports name files by UID ("1.2.840.113619.2.55"): any other suffix
                # is checked for the DICOM magic (132 bytes), so none is silently left out.
                and (p.suffix.lower() in IMAGE_SUFFIXES or is_dicom(p))
            ]
            found += sorted(
                (SourceFile(str(p), p.relative_to(root).as_posix()) for p in files),
                key=lambda s: s.key,
            )
        else:
            raise FileNotFoundError(f"ingest source {source} does not exist")
    return found


_CSV_COLUMNS = set(METADATA_COLUMNS)


def _read_file_list(path: Path) -> list[SourceFile]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(
                f"{path}: a file list needs a 'path' column (found {reader.fieldnames})"
            )
        unknown = [
            c
            for c in reader.fieldnames
            if c not in ("path", BOXES_COLUMN)
            and c not in _CSV_COLUMNS
            and not c.startswith((LABEL_PREFIX, MASK_PREFIX))
        ]
        if unknown:
            raise ValueError(
                f"{path}: unknown column {unknown[0]!r}; allowed: path, boxes, "
                f"{', '.join(sorted(_CSV_COLUMNS))}, {LABEL_PREFIX}*, {MASK_PREFIX}*"
            )
        out = []
        for line, row in enumerate(reader, start=2):
            listed = row.pop("path")
            if not listed:
                raise ValueError(f"{path}:{line}: empty path")
            file = Path(listed) if Path(listed).is_absolute() else path.parent / listed
            metadata: dict[str, Any] = {}
            for column, value in row.items():
                if value in (None, ""):
                    continue
                if column.startswith(LABEL_PREFIX):
                    if value not in ("0", "1"):
                        raise ValueError(f"{path}:{line}: {column}={value!r} is not 0/1")
                    metadata[column] = int(value)
                elif column.startswith(MASK_PREFIX):
                    mask = Path(value)
                    metadata[column] = str(mask if mask.is_absolute() else path.parent / mask)
                else:
                    metadata[column] = value
            out.append(SourceFile(str(file), listed, metadata))
    return out


def attach_mask_folder(files: list[SourceFile], folder: str | Path) -> list[SourceFile]:
    """Masks from `folder/<class>/<name>.<png|gif|...>`, matched to each image by its file
    name without suffix (JSRT/SCR's layout: one folder per structure): a `mask_<class>` entry
    in the file's metadata holds the mask's path. Images without a mask of a class get none
    (stored null: not annotated); a mask matching no image is an error (a naming mismatch
    would otherwise silently leave a class empty)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"mask folder {folder} does not exist")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"mask folder {folder}: no class folders (expected {folder}/<class>/)")
    stems = {Path(f.key).stem for f in files}
    by_class: dict[str, dict[str, str]] = {}
    for class_dir in classes:
        found: dict[str, str] = {}
        for mask in sorted(class_dir.iterdir()):
            if mask.suffix.lower() not in MASK_SUFFIXES:
                continue
            if mask.stem in found:
                raise ValueError(f"{class_dir}: two masks named {mask.stem!r}")
            if mask.stem not in stems:
                raise ValueError(f"{mask}: no image named {mask.stem!r} among the sources")
            found[mask.stem] = str(mask)
        by_class[MASK_PREFIX + _column_name(class_dir.name)] = found
    out = []
    for f in files:
        stem = Path(f.key).stem
        extra = {c: found[stem] for c, found in by_class.items() if stem in found}
        out.append(SourceFile(f.path, f.key, {**f.metadata, **extra}))
    return out


def _column_name(name: str) -> str:
    """A class folder's name as a column suffix: "left lung" -> "left_lung"."""
    return "_".join(name.lower().replace("-", " ").split())


def mask_columns_of(files: list[SourceFile]) -> tuple[str, ...]:
    """Every `mask_*` class any file has, sorted: the corpus's mask columns."""
    return tuple(sorted({k for f in files for k in f.metadata if k.startswith(MASK_PREFIX)}))


def load_mask(path: str, shape: tuple[int, ...], options: IngestOptions) -> np.ndarray:
    """A mask file -> uint8 0/1 at the stored geometry: it must match its image's size, and
    it is fitted exactly like the image (same resize and padding), then cut at half."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L")) > 0
    except (OSError, ValueError) as e:
        raise BadImage(f"unreadable mask ({type(e).__name__})") from None
    if mask.shape != shape:
        raise BadImage(f"mask of size {mask.shape} for an image of size {shape}")
    fitted = fit_square(mask.astype(np.uint8) * 255, options.size, options.resize)
    return (fitted >= 128).astype(np.uint8)


def fit_boxes(
    value: str | None, shape: tuple[int, ...], options: IngestOptions
) -> list[list[float | str]] | None:
    """A box list in the source image's pixels -> the stored image's pixels: the scale and
    padding `fit_square` gives the image (rounded sizes included), applied to the corners."""
    if value is None:
        return None
    height, width = int(shape[0]), int(shape[1])
    try:
        boxes = check_boxes(value, (height, width), "boxes")
    except CorpusError as e:
        raise BadImage(str(e)) from None
    assert boxes is not None
    size = options.size
    if options.resize == "stretch":
        new_h = new_w = size
    else:
        scale = size / (min if options.resize == "shortest" else max)(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    top = left = 0
    if options.resize == "pad" and (new_h, new_w) != (size, size):
        top, left = (size - new_h) // 2, (size - new_w) // 2
    sy, sx = new_h / height, new_w / width
    return [
        [left + b[0] * sx, top + b[1] * sy, left + b[2] * sx, top + b[3] * sy, *b[4:]]  # type: ignore[operator]
        for b in boxes
    ]


def image_id_for(key: str, salt: str, uid: str | None = None) -> str:
    """Stable id that reveals neither the path nor the SOP instance UID (as long as the salt
    is secret). Side files name a file that has no image by `image_id_for(key, salt)`."""
    return hashlib.sha256(f"{salt}\0{key}\0{uid or ''}".encode()).hexdigest()[:16]


def shuffled(
    files: list[SourceFile], reports: Mapping[str, Mapping[str, str | None]], seed: int
) -> list[SourceFile]:
    """`files` in a seeded random order that keeps the views of one study together (in
    their listed order): rows are stored in this order, so a row group, which the pipeline
    reads as one unit, mixes patients and series instead of holding one folder. The order
    is a sort by a hash of (seed, study or file name), so it is the same for the same files
    and seed, and adding a file moves only the files after it."""

    def rank(source: SourceFile) -> bytes:
        study = _study_of(source, reports)
        unit = f"study\0{study}" if study else f"file\0{source.key}"
        return hashlib.sha256(f"{seed}\0{unit}".encode()).digest()

    return sorted(files, key=rank)  # stable: ties keep the listed order


def _study_of(source: SourceFile, reports: Mapping[str, Mapping[str, str | None]]) -> str | None:
    """The study a file belongs to: a joined report's, else its file list's `study_id`."""
    return _joined(source.key, reports).get("study_id") or source.metadata.get("study_id")


def _list_digest(files: list[SourceFile]) -> str:
    """sha256 of the file list as found (paths, names, list metadata)."""
    digest = hashlib.sha256()
    for source in files:
        blob = json.dumps([source.path, source.key, source.metadata], sort_keys=True)
        digest.update(blob.encode() + b"\n")
    return digest.hexdigest()


def _is_dicom_source(source: SourceFile) -> bool:
    from raydiology.data.dicom import is_dicom

    suffix = Path(source.path).suffix.lower()
    if suffix in (".dcm", ".dicom"):
        return True
    return suffix not in IMAGE_SUFFIXES and is_dicom(source.path)


# ----------------------------------------------------------------------------- stage 1


def load_any(
    path: str, *, allow_burned_in: bool = False, clip_percentile: float | None = None
) -> tuple[np.ndarray, dict[str, Any], str | None]:
    """(pixels, metadata, DICOM UID) for a DICOM or PNG/JPEG file; BadImage otherwise."""
    from raydiology.data.dicom import is_dicom, load_dicom

    if os.path.getsize(path) == 0:
        raise BadImage("empty file (0 bytes)")
    if is_dicom(path) or Path(path).suffix.lower() in (".dcm", ".dicom"):
        loaded = load_dicom(path, allow_burned_in=allow_burned_in, clip_percentile=clip_percentile)
        metadata = {k: v for k, v in loaded.metadata.items() if v is not None}
        return loaded.pixels, metadata, loaded.uid
    return load_image(path, clip_percentile=clip_percentile), {}, None


_STAGED_GROUP_ROWS = 16
_STAGING_SCHEMA = pa.schema(
    [
        ("file_index", pa.int64()),
        ("image_id", pa.string()),
        ("pixels", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("dtype", pa.string()),
        ("content_sha256", pa.string()),
        ("phash", pa.uint64()),
        ("metadata", pa.string()),  # JSON: DICOM metadata + file-list columns
        ("masks", pa.map_(pa.string(), pa.binary())),  # mask_* column -> stored mask bytes
    ]
)


def decode_chunk(
    chunk: int,
    files: list[SourceFile],
    first_index: int,
    options: IngestOptions,
    salt: str,
    staging: str,
) -> dict[str, Any]:
    """Stage 1 for one chunk of files; idempotent (a finished chunk is not redone)."""
    from raydiology.data.dedup import perceptual_hash

    done = Path(staging) / f"chunk-{chunk:05d}.json"
    digest = _chunk_digest(files, first_index, options.fingerprint(salt))
    result = _read_marker(done)
    if result is not None and result.get("digest") == digest:
        return {**result, "skipped": True}
    rows: dict[str, list] = {name: [] for name in _STAGING_SCHEMA.names}
    quarantined = []
    for offset, source in enumerate(files):
        index = first_index + offset
        try:
            pixels, metadata, uid = load_any(
                source.path,
                allow_burned_in=options.allow_burned_in,
                clip_percentile=options.clip_percentile,
            )
            stored = fit_square(
                to_bit_depth(pixels, options.bit_depth), options.size, options.resize
            )
            boxes = fit_boxes(source.metadata.get(BOXES_COLUMN), pixels.shape, options)
            masks = {
                k: load_mask(v, pixels.shape, options).tobytes()
                for k, v in sorted(source.metadata.items())
                if k.startswith(MASK_PREFIX)
            }
        except BadImage as e:
            quarantined.append({"file_index": index, "reason": _scrub(str(e), source)})
            continue
        except Exception as e:  # a decoder bug must not end a night's ingest either
            # Its message may quote header values or the path: only the type is kept.
            reason = f"{type(e).__name__}: unexpected decoder error (details withheld)"
            quarantined.append({"file_index": index, "reason": reason})
            continue
        rows["file_index"].append(index)
        rows["image_id"].append(image_id_for(source.key, salt, uid))
        rows["pixels"].append(np.ascontiguousarray(stored).tobytes())
        rows["height"].append(stored.shape[0])
        rows["width"].append(stored.shape[1])
        rows["dtype"].append(stored.dtype.name)
        # Exact duplicates: hash of the decoded source pixels, before resizing.
        rows["content_sha256"].append(
            hashlib.sha256(f"{pixels.dtype}{pixels.shape}".encode() + pixels.tobytes()).hexdigest()
        )
        rows["phash"].append(perceptual_hash(pixels))  # the source, before resizing
        listed = {k: v for k, v in source.metadata.items() if not k.startswith(MASK_PREFIX)}
        if boxes is not None:
            listed[BOXES_COLUMN] = json.dumps(boxes)
        rows["metadata"].append(json.dumps({**metadata, **listed}, sort_keys=True))
        rows["masks"].append(list(masks.items()))
    table = pa.table(rows, schema=_STAGING_SCHEMA)
    parquet = Path(staging) / f"chunk-{chunk:05d}.parquet"
    # Small row groups: a shard task then reads only the row groups holding its rows.
    pq.write_table(table, f"{parquet}.tmp", compression="lz4", row_group_size=_STAGED_GROUP_ROWS)
    os.replace(f"{parquet}.tmp", parquet)
    result = {"chunk": chunk, "digest": digest, "rows": table.num_rows,
              "quarantined": quarantined}  # fmt: skip
    _write_marker(done, result)  # written last: marks the chunk finished
    return {**result, "skipped": False}


def _chunk_digest(files: list[SourceFile], first_index: int, fingerprint: str) -> str:
    """What a staged chunk holds: the options, its position in the file list, and each
    file's path, name, list metadata, size and mtime (a file replaced in place is decoded
    again). Stat runs here, in the decode task, so a million files cost the driver nothing."""
    digest = hashlib.sha256(f"{fingerprint}\0{first_index}".encode())
    for source in files:
        try:
            stat = os.stat(source.path)
            seen = [stat.st_size, stat.st_mtime_ns]
            for key in sorted(source.metadata):  # a mask replaced in place: decoded again
                if key.startswith(MASK_PREFIX):
                    stat = os.stat(source.metadata[key])
                    seen += [stat.st_size, stat.st_mtime_ns]
        except OSError:
            seen = [-1, -1]  # missing: quarantined by the decode, redone if it appears
        blob = json.dumps([source.path, source.key, source.metadata, seen], sort_keys=True)
        digest.update(blob.encode() + b"\n")
    return digest.hexdigest()


def _write_marker(path: Path, record: dict[str, Any]) -> None:
    """Write a done marker whole or not at all (temp file + rename): a crash mid-write must
    not leave a truncated marker behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _read_marker(path: Path) -> dict[str, Any] | None:
    """A done marker, or None when there is none or it is unreadable (e.g. truncated by a
    crash of an older version): its chunk or shard is then simply done again."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _scrub(reason: str, source: SourceFile) -> str:
    """A quarantine reason without the file's path or name (decoders such as PIL quote
    them; hospital paths carry patient ids)."""
    for text in (source.path, source.key, Path(source.path).name):
        if text:
            reason = reason.replace(text, "<file>")
    return reason


def _run_chunks(
    chunks: list[tuple[int, list[SourceFile], int]],
    options: IngestOptions,
    salt: str,
    staging: Path,
    *,
    parallel: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    calls = ((i, files, first, options, salt, str(staging)) for i, files, first in chunks)
    return _map(decode_chunk, calls, len(chunks), parallel=parallel, progress=progress,
                description="decoding")  # fmt: skip


def _map(
    function: Callable[..., dict[str, Any]],
    calls: Iterable[tuple],
    total: int,
    *,
    parallel: bool,
    progress: bool,
    description: str,
) -> list[dict[str, Any]]:
    """`function(*call)` for every call, results in call order; with `parallel`, each call is
    a Ray task (1 CPU) and at most two per CPU are in flight, so the driver never holds every
    call's arguments at once. A failed task does not stop the others: all that can finish do
    (and leave their done markers for a re-run), then the first error is raised."""
    if not parallel:
        return [
            function(*call)
            for call in progress_iter(calls, enabled=progress, description=description, total=total)
        ]
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(function)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    todo = enumerate(calls)
    position: dict[Any, int] = {}
    results: list[dict[str, Any] | None] = [None] * total
    errors: list[BaseException] = []

    def completed() -> Iterator[None]:
        while True:
            for i, call in todo:  # top the window up
                position[task.remote(*call)] = i
                if len(position) >= window:
                    break
            if not position:
                return
            (ready,), _ = ray.wait(list(position), num_returns=1)
            i = position.pop(ready)
            try:
                results[i] = ray.get(ready)
            except Exception as e:  # raised below, once the rest have finished
                errors.append(e)
            yield

    for _ in progress_iter(completed(), enabled=progress, description=description, total=total):
        pass
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


# ----------------------------------------------------------------------------- stages 2, 3


def ingest_images(
    sources: list[str | Path],
    out_dir: str | os.PathLike,
    *,
    size: int = 1024,
    resize: ResizeMode = "pad",
    bit_depth: Literal[8, 16] = 8,
    salt: str = "",
    attribution: str | None = None,
    near_duplicate_distance: int | None = 0,  # dedup.DEFAULT_MAX_DISTANCE
    allow_burned_in: bool = False,
    clip_percentile: float | None = None,
    reports: Mapping[str, Mapping[str, str | None]] | None = None,
    masks: str | Path | None = None,
    write_source_map: bool = False,
    chunk_rows: int = 256,
    shard_rows: int = 1024,
    shuffle_seed: int = DEFAULT_SHUFFLE_SEED,
    parallel: bool | None = None,
    progress: bool = True,
) -> IngestSummary:
    """Decode, deduplicate and shard every image under `sources` into a corpus at `out_dir`.

    `reports` maps a file name stem to columns to join (e.g. {"report": ..., "split": ...}),
    as built by `raydiology.data.reports`. `parallel` None = on Ray when Ray is initialised.
    `attribution` (a licence's required credit) is kept in the manifest and printed under
    every picture drawn from the corpus. Running the same ingest again is a no-op once it
    finished, and after an interruption skips the chunks decoded and the shards written;
    a rerun with a changed file list or options redoes exactly what they changed.
    `parallel` applies to decoding and shard writing alike. Rows are stored in an order
    drawn from `shuffle_seed` (views of one study stay together), the same for the same
    files and seed. `salt` keeps ids from being recomputed from file names: without one a
    warning is logged, and DICOM input is refused. `allow_burned_in` keeps DICOMs flagged
    BurnedInAnnotation YES (quarantined by default); `clip_percentile` is the intensity
    rule's optional per-image clip (see `raydiology.data.images`). `masks` is a folder of
    per-class mask folders matched by file name (`attach_mask_folder`); a CSV file list can
    name masks in `mask_*` columns instead. Either way a mask is fitted like its image.
    """
    if clip_percentile is not None:
        check_clip_percentile(clip_percentile)
    if resize not in ("pad", "stretch", "shortest"):
        raise ValueError(f"resize must be 'pad', 'stretch' or 'shortest', not {resize!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth!r}")
    if size < 1:
        raise ValueError(f"size must be positive, not {size}")
    if chunk_rows < 1 or shard_rows < 1:
        raise ValueError(
            f"chunk_rows and shard_rows must be positive, not {chunk_rows}, {shard_rows}"
        )
    options = IngestOptions(
        size=size,
        resize=resize,
        bit_depth=bit_depth,
        near_duplicate_distance=near_duplicate_distance,
        allow_burned_in=allow_burned_in,
        clip_percentile=clip_percentile,
    )
    out = Path(out_dir)
    files = find_sources(sources)
    if masks is not None:
        files = attach_mask_folder(files, masks)
    mask_columns = mask_columns_of(files)
    has_boxes = any(BOXES_COLUMN in f.metadata for f in files)
    if not salt:
        if any(_is_dicom_source(f) for f in files):
            raise ValueError(
                "DICOM input needs an id salt: without one, image ids are plain hashes of "
                f"file names and SOPInstanceUIDs that a hospital could look up; {SALT_HELP}"
            )
        log.warning("ingest: no id salt set, so image ids can be recomputed from file "
                    "names; %s", SALT_HELP)  # fmt: skip
    recorded = {
        "sources": [str(s) for s in sources],
        **asdict(options),
        "salted": bool(salt),  # the salt itself stays secret
        "files": len(files),
        "files_sha256": _list_digest(files),
        "reports_joined": reports is not None,
        **({"masks": str(masks)} if masks is not None else {}),
        "shard_rows": shard_rows,
        "shuffle_seed": shuffle_seed,
    }
    finished = _finished_summary(out, recorded)
    if finished is not None:
        return finished

    staging = out / STAGING_DIR
    if not staging.is_dir() and any((out / SHARDS_DIR).glob("*.parquet")):
        raise CorpusError(f"{out}: already holds corpus shards; choose an empty folder")
    staging.mkdir(parents=True, exist_ok=True)
    files = shuffled(files, reports or {}, shuffle_seed)
    chunks = [
        (i, files[start : start + chunk_rows], start)
        for i, start in enumerate(range(0, len(files), chunk_rows))
    ]
    if parallel is None:
        import ray

        parallel = ray.is_initialized()
    results = _run_chunks(chunks, options, salt, staging, parallel=parallel, progress=progress)
    quarantined = [
        {
            "file_id": image_id_for(files[q["file_index"]].key, salt),
            "reason": q["reason"],
            "file_index": q["file_index"],
        }
        for r in results
        for q in r["quarantined"]
    ]
    keep, duplicates, collisions = _deduplicate(
        staging, results, files, near_duplicate_distance, salt
    )
    quarantined += collisions
    for record in (*quarantined, *duplicates):  # paths only where a source map is asked for
        index = record.pop("file_index")
        if write_source_map:
            record["path"] = files[index].path
    layout = _ShardLayout.plan(staging, results, files, keep, reports or {}, shard_rows=shard_rows)
    plans = layout.plans(options.fingerprint(salt), {r["chunk"]: r["digest"] for r in results})
    calls = (
        (plan, layout.labels, str(staging), str(out), mask_columns, has_boxes) for plan in plans
    )
    written = _map(write_planned_shard, calls, len(layout.shards), parallel=parallel,
                   progress=progress, description="writing shards")  # fmt: skip
    _remove_stale_shards(out, len(written))
    if write_source_map:
        _write_source_map(out / SOURCE_MAP_NAME, staging, results, files, keep)
    quarantine_file = _write_jsonl(out / QUARANTINE_NAME, quarantined)
    _write_jsonl(out / DUPLICATES_NAME, duplicates)
    manifest = write_manifest(  # last: a corpus with a manifest is a finished one
        out,
        [ShardInfo(path=w["path"], rows=w["rows"], sha256=w["sha256"]) for w in written],
        schema=corpus_schema(layout.labels, (), mask_columns, has_boxes),
        sizes=[(h, w) for r in written for h, w in r["sizes"]],
        dtypes=[d for r in written for d in r["dtypes"]],
        made_by={"command": "ingest", "options": recorded, "attribution": attribution},
    )
    shutil.rmtree(staging)
    reasons = Counter(q["reason"].split(":")[0].split(" (")[0] for q in quarantined)
    summary = IngestSummary(
        found=len(files),
        ingested=manifest.rows,
        quarantined=len(quarantined),
        duplicates=len(duplicates),
        manifest=manifest,
        quarantine_file=quarantine_file,
        skipped_chunks=sum(r["skipped"] for r in results),
        skipped_shards=sum(r["skipped"] for r in written),
        reasons=dict(reasons),
    )
    # Counts only: reasons and paths stay in the quarantine file.
    log.info("ingest: found %d, ingested %d, quarantined %d, duplicates %d", summary.found,
             summary.ingested, summary.quarantined, summary.duplicates)  # fmt: skip
    return summary


def _finished_summary(out: Path, recorded: dict[str, Any]) -> IngestSummary | None:
    """The summary of an identical ingest that already finished at `out`, else None."""
    if not (out / MANIFEST_NAME).exists():
        return None
    manifest = read_manifest(out)
    before, now = manifest.made_by.get("options") or {}, json.loads(json.dumps(recorded))
    if before != now:
        changed = sorted(k for k in {*before, *now} if before.get(k) != now.get(k))
        raise FileExistsError(
            f"{out} already holds a corpus made with other sources or options (changed: "
            f"{', '.join(changed)}); choose another --out or remove it"
        )
    quarantine = out / QUARANTINE_NAME
    quarantined = len(quarantine.read_text().splitlines()) if quarantine.exists() else 0
    duplicates_file = out / DUPLICATES_NAME
    duplicates = len(duplicates_file.read_text().splitlines()) if duplicates_file.exists() else 0
    shutil.rmtree(out / STAGING_DIR, ignore_errors=True)  # left if it ended just after the manifest
    return IngestSummary(
        found=recorded["files"],
        ingested=manifest.rows,
        quarantined=quarantined,
        duplicates=duplicates,
        manifest=manifest,
        quarantine_file=str(quarantine) if quarantined else None,
        skipped_chunks=-1,  # the whole ingest was already done
        skipped_shards=-1,
    )


def _staged(staging: Path, results: list[dict[str, Any]], columns: list[str]):
    """Staged row batches in chunk order, reading only `columns`."""
    for r in results:
        yield from pq.ParquetFile(_chunk_path(staging, r["chunk"])).iter_batches(
            batch_size=64, columns=columns
        )


def _deduplicate(
    staging: Path,
    results: list[dict[str, Any]],
    files: list[SourceFile],
    near_duplicate_distance: int | None,
    salt: str,
) -> tuple[set[int], list[dict[str, Any]], list[dict[str, Any]]]:
    """File indices to keep, a record per dropped duplicate (first occurrence wins), and
    the files quarantined because their name collides with another source's; records name
    files by id and carry their `file_index` (the caller adds paths only if asked to)."""
    from raydiology.data.dedup import NearDuplicateIndex, hamming

    by_content: dict[str, str] = {}
    ids: dict[str, int] = {}
    phashes: dict[str, int] = {}
    near = NearDuplicateIndex(max_distance=near_duplicate_distance or 0)
    keep: set[int] = set()
    duplicates = []
    collisions = []
    columns = ["file_index", "image_id", "content_sha256", "phash"]
    for batch in _staged(staging, results, columns):
        for index, image_id, digest, phash in zip(
            *(batch.column(c).to_pylist() for c in columns), strict=True
        ):
            if image_id in ids:  # same relative path in two sources: the id would collide
                collisions.append(
                    {
                        "file_id": image_id_for(files[index].key, salt),
                        "reason": "same relative path as a file in another source",
                        "file_index": index,
                    }
                )
                continue
            if digest in by_content:
                first = by_content[digest]
                duplicates.append({"image_id": image_id, "duplicate_of": first, "kind": "exact",
                                   "file_index": index})  # fmt: skip
                continue
            if near_duplicate_distance is not None:
                first_near = near.add(image_id, phash)
                if first_near is not None:
                    distance = hamming(phash, phashes[first_near])
                    duplicates.append(
                        {
                            "image_id": image_id,
                            "duplicate_of": first_near,
                            "kind": "near",
                            "distance": distance,
                            "file_index": index,
                        }
                    )
                    continue
            by_content[digest] = image_id
            ids[image_id] = index
            phashes[image_id] = phash
            keep.add(index)
    return keep, duplicates, collisions


@dataclass(frozen=True)
class ShardPlan:
    """What one shard holds, decided on the driver from light columns: its rows as
    (staged chunk, ascending row positions) pieces, the source file of each row (a check),
    its row-group sizes, the report columns joined to each row, and a digest of all of it
    that tells whether a shard left by an interrupted run may stand."""

    index: int
    pieces: list[tuple[int, np.ndarray]]
    file_indices: np.ndarray  # int64 [rows]
    groups: list[int]
    joined: list[dict[str, str]]
    digest: str


@dataclass
class _ShardLayout:
    """The kept rows in staged order (arrays, one entry per row) and how they are cut into
    shards and row groups; `plans()` turns one shard at a time into a `ShardPlan`."""

    chunk: np.ndarray
    position: np.ndarray
    file_index: np.ndarray
    shards: list[list[int]]  # row-group sizes per shard
    labels: tuple[str, ...]
    files: list[SourceFile]
    reports: Mapping[str, Mapping[str, str | None]]

    @classmethod
    def plan(
        cls,
        staging: Path,
        results: list[dict[str, Any]],
        files: list[SourceFile],
        keep: set[int],
        reports: Mapping[str, Mapping[str, str | None]],
        *,
        shard_rows: int,
    ) -> _ShardLayout:
        chunk, position, file_index, sizes = [], [], [], []
        studies: list[str | None] = []
        labels: tuple[str, ...] | None = None
        kept = np.sort(np.fromiter(keep, np.int64, len(keep)))
        columns = ["file_index", "height", "width", "dtype"]
        for r in results:
            staged = pq.read_table(_chunk_path(staging, r["chunk"]), columns=columns)
            indices = staged.column("file_index").to_numpy().astype(np.int64)
            found = np.searchsorted(kept, indices).clip(max=max(len(kept) - 1, 0))
            rows = np.flatnonzero(kept[found] == indices) if len(kept) else np.zeros(0, np.int64)
            itemsize = np.array([np.dtype(d).itemsize for d in staged.column("dtype").to_pylist()])
            nbytes = staged.column("height").to_numpy() * staged.column("width").to_numpy()
            for index in indices[rows].tolist():
                joined = _joined(files[index].key, reports)
                row_labels = _label_columns(files[index].metadata, joined)
                if labels is None:
                    labels = row_labels
                elif set(row_labels) != set(labels):
                    raise CorpusError(  # no path: file names can identify patients
                        f"source file #{index}: label columns {sorted(row_labels)} differ "
                        f"from the first image's {sorted(labels)}"
                    )
                studies.append(_study_of(files[index], reports))
            chunk.append(np.full(len(rows), r["chunk"], np.int64))
            position.append(rows.astype(np.int64))
            file_index.append(indices[rows])
            sizes.append((nbytes * itemsize)[rows].astype(np.int64))
        empty = [np.zeros(0, np.int64)]
        row_sizes = np.concatenate(sizes or empty).tolist()
        return cls(
            chunk=np.concatenate(chunk or empty),
            position=np.concatenate(position or empty),
            file_index=np.concatenate(file_index or empty),
            shards=plan_shards(zip(row_sizes, studies, strict=True), shard_rows=shard_rows),
            labels=labels or (),
            files=files,
            reports=reports,
        )

    def plans(self, fingerprint: str, chunk_digests: Mapping[int, str]) -> Iterator[ShardPlan]:
        """One plan per shard, made as asked for (a million rows' report text stays out of
        memory until its shard is due). Its digest covers the staged chunks it reads from, so
        a shard left by a run over other files is written again."""
        start = 0
        for index, groups in enumerate(self.shards):
            stop = start + sum(groups)
            chunks, positions = self.chunk[start:stop], self.position[start:stop]
            file_indices = self.file_index[start:stop]
            pieces = [(int(c), positions[chunks == c]) for c in dict.fromkeys(chunks.tolist())]
            joined = [_joined(self.files[i].key, self.reports) for i in file_indices.tolist()]
            blob = json.dumps(
                [
                    fingerprint,
                    self.labels,
                    groups,
                    [(self.files[i].path, self.files[i].key) for i in file_indices],
                    joined,
                    [(c, chunk_digests[c], p.tolist()) for c, p in pieces],
                ]
            )
            yield ShardPlan(
                index=index,
                pieces=pieces,
                file_indices=file_indices,
                groups=groups,
                joined=joined,
                digest=hashlib.sha256(blob.encode()).hexdigest(),
            )
            start = stop


def write_planned_shard(
    plan: ShardPlan,
    labels: tuple[str, ...],
    staging: str,
    out_dir: str,
    masks: tuple[str, ...] = (),
    boxes: bool = False,
) -> dict[str, Any]:
    """Stage 3 for one shard (a Ray task when parallel); idempotent: a shard whose done
    marker matches its plan and whose file is whole is not written again."""
    done = Path(staging) / f"shard-{plan.index:05d}.json"
    final = shard_file(out_dir, plan.index)
    result = _read_marker(done)
    if (
        result is not None
        and result.get("digest") == plan.digest
        and final.is_file()
        and final.stat().st_size == result.get("bytes")
    ):
        return {**result, "skipped": True}
    schema = corpus_schema(labels, (), masks, boxes)
    sizes: set[tuple[int, int]] = set()
    dtypes: set[str] = set()

    def row_groups() -> Iterator[pa.Table]:
        taken = (
            table
            for chunk, positions in plan.pieces
            for table in _take_staged(Path(staging), chunk, positions)
        )
        start = 0
        for staged in _regroup(taken, plan.groups):
            stop = start + staged.num_rows
            if staged.column("file_index").to_pylist() != plan.file_indices[start:stop].tolist():
                raise CorpusError(f"{staging}: staged rows differ from shard {plan.index}'s plan")
            group = _corpus_table(staged, plan.joined[start:stop], labels, schema)
            sizes.update(zip(group["height"].to_pylist(), group["width"].to_pylist(), strict=True))
            dtypes.update(group["dtype"].unique().to_pylist())
            start = stop
            yield group

    info = write_shard(out_dir, plan.index, row_groups(), schema=schema)
    result = {
        "index": plan.index,
        "digest": plan.digest,
        "path": info.path,
        "rows": info.rows,
        "sha256": info.sha256,
        "bytes": final.stat().st_size,
        "sizes": sorted(sizes),
        "dtypes": sorted(dtypes),
    }
    _write_marker(done, result)  # written last: marks the shard finished
    return {**result, "skipped": False}


_STAGED_COLUMNS = [
    "file_index", "image_id", "pixels", "height", "width", "dtype", "metadata", "masks",
]  # fmt: skip


def _take_staged(staging: Path, chunk: int, positions: np.ndarray) -> Iterator[pa.Table]:
    """The staged rows at `positions` (ascending) of a chunk, reading only the row groups
    that hold them."""
    file = pq.ParquetFile(_chunk_path(staging, chunk))
    first = 0
    for group in range(file.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        lo, hi = np.searchsorted(positions, [first, first + rows])
        if hi > lo:
            table = file.read_row_group(group, columns=_STAGED_COLUMNS)
            yield table.take(pa.array(positions[lo:hi] - first))
        first += rows
        if hi == len(positions):
            return


def _regroup(tables: Iterable[pa.Table], sizes: list[int]) -> Iterator[pa.Table]:
    """Re-cut a stream of tables into tables of exactly `sizes` rows."""
    wanted = iter(sizes)
    want = next(wanted, 0)
    pending: list[pa.Table] = []
    have = 0
    for table in tables:
        while table.num_rows:
            take = min(want - have, table.num_rows)
            pending.append(table.slice(0, take))
            table, have = table.slice(take), have + take
            if have == want:
                yield pa.concat_tables(pending).combine_chunks()
                pending, have, want = [], 0, next(wanted, 0)


def _corpus_table(
    staged: pa.Table, joined: list[dict[str, str]], labels: tuple[str, ...], schema: pa.Schema
) -> pa.Table:
    """Staged rows as corpus rows: pixels and geometry pass through as Arrow columns; the
    small metadata (DICOM fields, file-list columns, joined report) becomes typed columns,
    with the checks `CorpusWriter.add` makes."""
    allowed = set(METADATA_COLUMNS) | set(labels) | {BOXES_COLUMN}
    ids = staged.column("image_id").to_pylist()
    rows = []
    for image_id, text, extra in zip(
        ids, staged.column("metadata").to_pylist(), joined, strict=True
    ):
        row = {**json.loads(text), **extra}
        unknown = set(row) - allowed
        if unknown:
            raise CorpusError(f"{image_id}: unknown column {sorted(unknown)[0]!r}")
        if not set(labels) <= set(row):
            raise CorpusError(f"{image_id}: label columns differ from the first image's")
        for name in labels:
            if row[name] not in (0, 1):
                raise CorpusError(f"{image_id}: {name}={row[name]!r} is not 0/1")
        rows.append(row)
    if not set(staged.column("dtype").unique().to_pylist()) <= {"uint8", "uint16"}:
        raise CorpusError(f"{ids[0]}..: pixels dtype is not uint8/uint16")
    columns = {name: staged.column(name) for name in ("image_id", "pixels", "height", "width")}
    columns["dtype"] = staged.column("dtype")
    for name in METADATA_COLUMNS:
        columns[name] = pa.array(
            [None if r.get(name) is None else str(r[name]) for r in rows], pa.string()
        )
    for name in labels:
        columns[name] = pa.array([int(r[name]) for r in rows], pa.int8())
    if BOXES_COLUMN in schema.names:
        columns[BOXES_COLUMN] = pa.array([r.get(BOXES_COLUMN) for r in rows], pa.string())
    staged_masks = [dict(m or ()) for m in staged.column("masks").to_pylist()]
    for field_ in schema:
        if field_.name.startswith(MASK_PREFIX):
            columns[field_.name] = pa.array([m.get(field_.name) for m in staged_masks], pa.binary())
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _joined(key: str, reports: Mapping[str, Mapping[str, str | None]]) -> dict[str, str]:
    """The non-empty report columns joined to the file named `key`."""
    return {k: v for k, v in _report_for(key, reports).items() if v}


def _label_columns(metadata: Mapping[str, Any], joined: Mapping[str, str]) -> tuple[str, ...]:
    """A row's label columns in the order its merged metadata lists them (file-list columns,
    sorted as staged, then joined ones): the first row's order is the corpus's."""
    names = [*sorted(metadata), *(k for k in joined if k not in metadata)]
    return tuple(k for k in names if k.startswith(LABEL_PREFIX))


def _remove_stale_shards(out: Path, count: int) -> None:
    """Shards beyond `count` (or half-written ones) left by an interrupted ingest that was
    planned differently; they must not sit beside the corpus."""
    for path in (out / SHARDS_DIR).glob("part-*.parquet*"):
        index = int(path.name.split(".")[0].removeprefix("part-"))
        if index >= count or path.name.endswith(".tmp"):
            path.unlink()


def _chunk_path(staging: Path, chunk: int) -> Path:
    return staging / f"chunk-{chunk:05d}.parquet"


def _report_for(
    key: str, reports: Mapping[str, Mapping[str, str | None]]
) -> Mapping[str, str | None]:
    """The report joined to a file: report corpora name images by stem ("CXR1_1_IM-0001-3001")
    or, where stems repeat across studies, by the last folders too ("CXR2384_IM-0942/0");
    the longest trailing part of the file's path that a corpus knows wins."""
    if not reports:
        return {}
    parts = Path(key).with_suffix("").parts
    for start in range(len(parts)):
        found = reports.get("/".join(parts[start:]))
        if found is not None:
            return found
    return {}


def _write_source_map(
    path: Path,
    staging: Path,
    results: list[dict[str, Any]],
    files: list[SourceFile],
    keep: set[int],
) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image_id", "path"])
        for batch in _staged(staging, results, ["file_index", "image_id"]):
            for index, image_id in zip(
                *(batch.column(c).to_pylist() for c in ("file_index", "image_id")), strict=True
            ):
                if index in keep:
                    out.writerow([image_id, files[index].path])


def _write_jsonl(path: Path, records: list[dict]) -> str | None:
    if not records:
        path.unlink(missing_ok=True)  # e.g. from a run with other options that was cut short
        return None
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def report_columns(
    records: Iterable[ReportRecord], *, clean: CleanStyle | None = None
) -> dict[str, dict[str, str | None]]:
    """Image key (file stem) -> the columns a report corpus joins onto it (report, findings
    and impression where the source has those sections, split, study_id: the views of one
    study share it, which multi-view training groups by).

    `clean` applies R2Gen's report cleaning for that corpus style to each text column.
    """
    from raydiology.data.reports import clean_report, index_by_image_key

    def text(value: str | None) -> str | None:
        if not value:
            return None
        return clean_report(value, style=clean) if clean else value

    return {
        key: {"report": text(record.report), "findings": text(record.findings),
              "impression": text(record.impression), "split": record.split,
              "study_id": record.study_id}
        for key, record in index_by_image_key(records).items()
    }  # fmt: skip
