"""Ray Data pipeline: corpus shards -> decoded, resized training batches.

    row groups of the shards (shuffled per epoch) -> map_batches(read_row_group: read +
    decode + resize + augment) -> Ray Train's streaming_split
    -> worker: get_dataset_shard("train").iter_torch_batches() -> to_model_input on device

All per-image work (decode, crop, resize, flip) happens here, in Ray Data tasks scheduled
anywhere on the cluster, batched with torch ops; the training worker moves integer images
to its device and normalises them there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from raydiology.config import DataConfig
from raydiology.config_base import to_dict

# Columns read from the shards: pixels and what decoding needs, plus labels for evaluation.
_PIXEL_COLUMNS = ["image_id", "pixels", "height", "width", "dtype"]
# What grouping views into studies reads (`data.study_views` > 1); `view` is optional.
_STUDY_COLUMNS = ["study_id", "view"]
# Views sorted frontal first within a study, so a model sees them in a stable order.
_VIEW_ORDER = {"PA": 0, "AP": 1, "FRONTAL": 2, "LATERAL": 3, "LL": 4, "RL": 5}


def build_dataset(
    data: DataConfig,
    corpus_dir: str,
    *,
    label_columns: tuple[str, ...] = (),
    extra_columns: dict[str, str] | None = None,
    first_epoch: int = 0,
    mask_columns: tuple[str, ...] = (),
):
    """The training dataset for one experiment; lazy until Ray Train iterates it.

    One Ray Data row per Parquet row group; each task reads its row group and decodes it in
    the same process (`read_row_group`). Measured against `read_parquet -> map_batches`,
    which moves every image through the object store between the read and the decode, this
    delivered about twice the images/s at 1280 px. Row-group order is shuffled per epoch,
    deterministically from `data.shuffle_seed`. `extra_columns` maps batch keys to numeric
    corpus columns an objective needs (e.g. the per-image masking region); `mask_columns`
    (`mask_*`) arrive as "mask"/"mask_known", with the image's geometry.

    Epoch e is the dataset's e-th execution: Ray Data counts them (the count reseeds the
    row-group order) and every decode task seeds its augmentation from the same count. A
    resume from epoch E passes `first_epoch=E` so the order and augmentation replay E's.
    """
    import pyarrow.parquet as pq
    import ray.data

    from raydiology.data.corpus import read_manifest, shard_paths

    extra_columns = extra_columns or {}
    columns = [*_PIXEL_COLUMNS, *label_columns, *extra_columns.values(), *mask_columns]
    if data.anatomy_weights:
        columns.append("anatomy")
    if data.splits:
        columns.append("split")
    units = [
        {"path": path, "row_group": group}
        for path in shard_paths(corpus_dir)
        for group in range(pq.ParquetFile(path).metadata.num_row_groups)
    ]
    ds: ray.data.Dataset = ray.data.from_items(units, override_num_blocks=len(units))
    ds.context._execution_idx = first_epoch  # Ray's execution count; no public setter
    if data.shuffle_seed is not None:
        # reseeded on every execution: a different, reproducible order each epoch
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=data.shuffle_seed))
    settings = {
        "columns": columns,
        "data": to_dict(data),
        "label_columns": list(label_columns),
        "extra_columns": extra_columns,
        "mask_columns": list(mask_columns),
        # one dtype for the whole corpus (a mixed 8/16-bit corpus travels as 16-bit)
        "out_dtype": read_manifest(corpus_dir).dtype or "uint16",
    }
    if data.decode_pool == "actors":
        size = data.decode_concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
        return ds.map_batches(
            RowGroupReader,
            fn_constructor_kwargs={"settings": settings},
            batch_size=1,
            batch_format="numpy",
            # the pool grows up to `size` actors and shrinks when idle
            concurrency=(1, size),
        )
    return ds.map_batches(
        read_row_group,  # type: ignore[arg-type]  # Ray's stub misses keyword-only fn_kwargs
        fn_kwargs=settings,
        batch_size=1,
        batch_format="numpy",
        concurrency=data.decode_concurrency,
    )


class RowGroupReader:
    """`read_row_group` in a long-lived actor (`data.decode_pool: actors`)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def __call__(self, unit: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        return read_row_group(unit, **self.settings)


def read_row_group(
    unit: dict[str, np.ndarray], *, columns: list[str], data: dict[str, Any], **preprocess: Any
) -> Iterator[dict[str, np.ndarray]]:
    """Read one row group of a shard and yield preprocessed batches of `decode_batch_size`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raydiology.config_base import from_dict

    cfg = from_dict(DataConfig, data, "data")  # once per row group, not once per batch
    epoch = _execution_index()
    path, group = str(unit["path"][0]), int(unit["row_group"][0])
    # Memory-mapped and single-threaded (a task has one CPU): read at 1280 px about twice
    # as fast as the default buffered, threaded read (the pixel pages barely compress).
    shard = pq.ParquetFile(path, memory_map=True)
    if cfg.study_views > 1:
        columns = _with_study_columns(columns, shard.schema_arrow.names, path)
    table = shard.read_row_group(group, columns=columns, use_threads=False)
    if cfg.splits:
        table = table.filter(pc.is_in(table.column("split"), value_set=pa.array(list(cfg.splits))))
    for start, length in study_chunks(table, cfg.decode_batch_size, cfg.study_views):
        chunk = table.slice(start, length)
        # copy=False: Ray copies the batch into its object store anyway
        out = preprocess_batch(
            column_arrays(chunk, columns), data=cfg, copy=False, epoch=epoch, **preprocess
        )
        if len(out["row_key"]):
            yield out


def _execution_index() -> int:
    """Which execution of its dataset (epoch) this task serves: Ray Data installs the
    dataset's DataContext, with its execution count, in every task. 0 outside Ray Data."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


def column_arrays(table: pa.Table, columns: list[str]) -> dict[str, np.ndarray]:
    """Arrow columns -> numpy, the pixel blobs without a copy where every row has one size.

    Same-size blobs lie end to end in the Arrow binary array's data buffer, so they are a
    [B, nbytes] uint8 view of it: no per-row bytes objects and no join, which at 1280 px
    were a third of a row group's decode time (`decode_pixels` takes either form).
    """
    out = {}
    for name in columns:
        column = table.column(name)
        blobs = _fixed_size_blobs(column) if name == "pixels" else None
        out[name] = blobs if blobs is not None else column.to_numpy(zero_copy_only=False)
    return out


def _fixed_size_blobs(column: pa.ChunkedArray) -> np.ndarray | None:
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if array.null_count or not (
        pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)
    ):
        return None
    n = len(array)
    _, offsets_buffer, data_buffer = array.buffers()
    if n == 0 or data_buffer is None:
        return None
    offset_type = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[array.offset : array.offset + n + 1]
    sizes = np.diff(offsets)
    if not (sizes == sizes[0]).all():
        return None
    data = np.frombuffer(data_buffer, dtype=np.uint8)[int(offsets[0]) : int(offsets[-1])]
    return data.reshape(n, int(sizes[0]))


def preprocess_batch(
    batch: dict[str, np.ndarray],
    *,
    data: DataConfig | dict[str, Any],
    label_columns: list[str],
    extra_columns: dict[str, str] | None = None,
    out_dtype: str = "uint8",
    copy: bool = True,
    epoch: int = 0,
    mask_columns: list[str] | None = None,
    box_column: str | None = None,
) -> dict[str, np.ndarray]:
    """Stored pixels -> integer [B, 1, R, R] images at the model's resolution (+ columns);
    R is `data.crop_source_size` instead where an objective cuts its own views from more pixels.

    Images stay integers (uint8/uint16, `out_dtype`) on their way to the training worker:
    float32 at 1280x1280 is 6.5 MB an image, and moving that through the object store made
    the pipeline ~20x slower than moving the integers (docs/corpus_format.md). The worker
    scales and normalises on its device with `to_model_input`. `copy=False` lets images
    stored at the model's size stay a read-only view of the batch's pixel buffer.

    Every image is fitted to R x R by `data.fit` on its own, so its output never depends on
    the other rows of its chunk. Random choices (crop box, flip, anatomy sampling) come from
    a generator seeded by (data seed, `epoch`, row key): an epoch replays exactly on resume.
    The "region" extra column (masking boxes, fractions of the stored image) follows the
    image's fit, crop and flip; a row without one gets NaN (the objective's default region).
    `mask_columns` (segmentation masks at the stored size) travel as extra channels of the
    image through the same fit, crop, resize and flip, then are cut at 0.5: "mask" uint8
    [B, K, R, R] and "mask_known" bool [B, K] (False where the corpus holds no mask).
    `box_column` (a box list, `data.corpus.BOXES_COLUMN`) follows the same geometry: "boxes"
    float32 [B, M, 4] (x0, y0, x1, y1 in pixels of the R x R input; rows with fewer boxes,
    and boxes cropped away, are NaN), "box_label" and "box_phrase" object [B] of lists (one
    entry per box, "" without a phrase), "box_known" bool [B] (False: not annotated).
    """
    from raydiology.config_base import from_dict

    cfg = from_dict(DataConfig, data, "data")
    keys = row_keys(batch["image_id"])
    seed = cfg.shuffle_seed or 0
    if cfg.anatomy_weights:
        keep = _keep_by_anatomy(batch["anatomy"], cfg.anatomy_weights, keys, seed, epoch)
        batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
        keys = keys[keep]
    extra = dict(extra_columns or {})
    boxes = _region_boxes(batch[extra.pop("region")]) if "region" in extra else None
    box_list = _box_lists(batch, box_column) if box_column else None
    moving = boxes if box_list is None else _join_boxes(boxes, box_list[0])
    masks = list(mask_columns or [])
    images, moved, seg = _fit_images(batch, cfg, keys, seed, epoch, moving, out_dtype, copy, masks)
    out = {"image": images, "row_key": keys}
    if box_list is None:
        boxes = moved
    else:  # split the moved set back into the region (box 0, if any) and the box lists
        assert moved is not None
        lists = moved if boxes is None else moved[:, 1:]
        boxes = None if boxes is None else moved[:, 0]
        out["boxes"] = _to_pixel_xyxy(lists, images.shape[-1])
        out["box_label"], out["box_phrase"], out["box_known"] = box_list[1:]
    if seg is not None:
        out["mask"], out["mask_known"] = seg
    for column in label_columns:
        out[column] = np.asarray(batch[column], dtype=np.float32)
    if boxes is not None:
        out["region"] = boxes
    for key, column in extra.items():
        out[key] = _extra_column(batch[column])
    if cfg.study_views > 1:
        out = group_views(out, batch, cfg.study_views)
    return out


def _fit_images(
    batch: dict[str, np.ndarray],
    cfg: DataConfig,
    keys: np.ndarray,
    seed: int,
    epoch: int,
    boxes: np.ndarray | None,
    out_dtype: str,
    copy: bool,
    mask_columns: list[str],
) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """Decode, fit, augment and resize each image -> (integer [B, 1, R, R], moved boxes,
    (masks [B, K, R, R], known [B, K]) or None without mask columns)."""
    from raydiology.data.corpus import decode_masks, decode_pixels

    r = cfg.batch_side
    augment = cfg.augment.hflip or cfg.augment.crop_scale is not None
    n = len(keys)
    k = len(mask_columns)
    decoded = None  # [B, H, W] uint8 / uint16 when the chunk has one size: one frombuffer
    if n and not augment and _uniform_size(batch):
        decoded = decode_pixels(batch)
        if decoded.shape[1:] == (r, r) and decoded.dtype == out_dtype:
            # the fast path: stored at the model's size
            seg = decode_masks(batch, mask_columns, (r, r)) if k else None
            return (np.array(decoded[:, None]) if copy else decoded[:, None]), boxes, seg
    images = np.zeros((n, 1, r, r), dtype=out_dtype)
    masks = np.zeros((n, k, r, r), dtype=np.uint8)
    known = np.zeros((n, k), dtype=bool)
    if boxes is not None:
        boxes = boxes.copy()
    # Images of one size go through torch together: the same arithmetic as one at a time
    # (tests/test_geometry.py checks the bytes), at a fraction of the per-call overhead.
    for rows in _same_size_groups(batch) if not augment else ([i] for i in range(n)):
        if decoded is not None:
            pixels = decoded
        else:
            pixels = decode_pixels({k: np.asarray(batch[k])[rows] for k in _PIXEL_COLUMNS})
        stack = _to_unit_float(pixels).unsqueeze(1)  # [b, 1, H, W]
        if k:  # masks ride along as channels 1..K: every geometric step treats them alike
            rows_batch = {name: np.asarray(batch[name], dtype=object)[rows] for name in
                          ["image_id", *mask_columns]}  # fmt: skip
            stored, known[rows] = decode_masks(rows_batch, mask_columns, pixels.shape[1:])
            stack = torch.cat([stack, torch.from_numpy(stored).float()], dim=1)
        canvas = _canvas(stack, cfg.fit)
        if boxes is not None:
            boxes[rows] = _canvas_boxes(boxes[rows], pixels.shape[1:], cfg.fit)
        if augment:  # one row: its own generator
            rng = _row_rng(seed, epoch, keys[rows[0]], _AUGMENT)
            resized, box = _augment(canvas, cfg, rng, None if boxes is None else boxes[rows])
            if boxes is not None:
                boxes[rows] = box
        else:
            resized = _resize(canvas, (r, r))
        images[rows] = _to_integer(resized[:, :1], out_dtype)
        if k:
            masks[rows] = (resized[:, 1:] >= 0.5).numpy()
    return images, boxes, ((masks, known) if k else None)


def _with_study_columns(columns: list[str], available: list[str], path: str) -> list[str]:
    if "study_id" not in available:
        raise ValueError(
            f"data.study_views > 1 groups views by the corpus's `study_id` column, which {path} "
            "lacks: ingest with reports (report_columns fills it) or a file list with study_id"
        )
    return [*columns, *(c for c in _STUDY_COLUMNS if c in available and c not in columns)]


def study_chunks(table: pa.Table, step: int, study_views: int) -> Iterator[tuple[int, int]]:
    """(start, rows) slices of about `step` rows; with `study_views` > 1 a slice never ends
    inside a study (the writer keeps a study's rows consecutive in one row group)."""
    n = table.num_rows
    studies = table.column("study_id").to_pylist() if study_views > 1 else None
    start = 0
    while start < n:
        end = min(start + step, n)
        if studies is not None:  # run on to the end of the study the slice stopped in
            while end < n and studies[end] is not None and studies[end] == studies[end - 1]:
                end += 1
        yield start, end - start
        start = end


def group_views(
    out: dict[str, np.ndarray], batch: dict[str, np.ndarray], views: int
) -> dict[str, np.ndarray]:
    """Per-image outputs -> one sample per study: image [S, V, 1, R, R] (zeros past a study's
    last view), view_mask [S, V] (True = a real view) and every other column from the study's
    first view (views share report and labels); row_key names the study.

    A study keeps at most V views, frontal first; rows without a study_id stand alone.
    """
    if "study_id" not in batch:
        raise ValueError("data.study_views > 1 needs the corpus's study_id column in the batch")
    ids = batch["image_id"]
    kinds = batch.get("view")
    members: dict[str, list[int]] = {}  # study -> its rows, in the order studies appear
    for row, study in enumerate(batch["study_id"]):
        members.setdefault(str(study) if study is not None else f"image:{ids[row]}", []).append(row)
    groups = []
    for rows in members.values():
        if kinds is not None:  # stable: same-kind views keep their stored order
            rows = sorted(rows, key=lambda r: _VIEW_ORDER.get(str(kinds[r]).upper(), 99))
        groups.append(rows[:views])
    images = out["image"]
    stacked = np.zeros((len(groups), views, *images.shape[1:]), dtype=images.dtype)
    mask = np.zeros((len(groups), views), dtype=bool)
    for s, rows in enumerate(groups):
        stacked[s, : len(rows)] = images[rows]
        mask[s, : len(rows)] = True
    first = np.array([rows[0] for rows in groups], dtype=np.int64)
    rest = {k: v[first] for k, v in out.items() if k not in ("image", "row_key")}
    keys = row_keys(np.array(list(members), dtype=object))
    return {"image": stacked, "view_mask": mask, "row_key": keys, **rest}


def _extra_column(values: np.ndarray) -> np.ndarray:
    """A corpus column as the batch carries it: text stays text (reports, for objectives
    that tokenize on the worker), list columns become float32 [B, ...], scalars float32 [B];
    a null list is a row of NaN as wide as the others."""
    if len(values) and all(v is None or isinstance(v, str) for v in values):
        return np.array(["" if v is None else v for v in values], dtype=object)
    if not len(values):
        return values
    # list columns arrive as an object array of per-row arrays
    present = [np.asarray(v, dtype=np.float32) for v in values if v is not None]
    blank = np.full(present[0].shape if present else (), np.nan, dtype=np.float32)
    return np.stack([blank if v is None else np.asarray(v, dtype=np.float32) for v in values])


def _box_lists(
    batch: dict[str, np.ndarray], column: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A box-list column -> (boxes float32 [B, M, 4] as (top, left, bottom, right) fractions
    of the stored image, NaN-padded; labels, phrases object [B] of lists; known bool [B])."""
    import json

    heights, widths = np.asarray(batch["height"]), np.asarray(batch["width"])
    parsed = [None if v is None else json.loads(v) for v in batch[column]]
    m = max((len(p) for p in parsed if p), default=0)
    boxes = np.full((len(parsed), m, 4), np.nan, dtype=np.float32)
    labels = np.empty(len(parsed), dtype=object)
    phrases = np.empty(len(parsed), dtype=object)
    for i, rows in enumerate(parsed):
        labels[i] = [str(b[4]) for b in rows or []]
        phrases[i] = [str(b[5]) if len(b) > 5 else "" for b in rows or []]
        for j, (x0, y0, x1, y1) in enumerate(b[:4] for b in rows or []):
            h, w = float(heights[i]), float(widths[i])
            boxes[i, j] = (y0 / h, x0 / w, y1 / h, x1 / w)
    known = np.array([p is not None for p in parsed], dtype=bool)
    return boxes, labels, phrases, known


def _join_boxes(region: np.ndarray | None, boxes: np.ndarray) -> np.ndarray:
    """The region [B, 4] (if any) as box 0 of the box lists [B, M, 4]: one set moves."""
    return boxes if region is None else np.concatenate([region[:, None], boxes], axis=1)


def _to_pixel_xyxy(boxes: np.ndarray, resolution: int) -> np.ndarray:
    """(top, left, bottom, right) fractions [B, M, 4] -> (x0, y0, x1, y1) pixels; a box the
    crop left without area becomes NaN (gone from the input)."""
    xyxy = boxes[..., [1, 0, 3, 2]] * resolution
    empty = (xyxy[..., 2] <= xyxy[..., 0]) | (xyxy[..., 3] <= xyxy[..., 1])
    xyxy[empty] = np.nan
    return xyxy.astype(np.float32)


def _region_boxes(values: np.ndarray) -> np.ndarray:
    """The masking-region column -> float32 [B, 4] (top, left, bottom, right), fractions of
    the stored image; a null region is a row of NaN, which the objective replaces with its
    configured `masking.region`."""
    if all(v is None for v in values):
        return np.full((len(values), 4), np.nan, dtype=np.float32)
    boxes = _extra_column(values).reshape(len(values), -1)
    if boxes.shape[1] != 4:
        raise ValueError(
            f"the masking region column holds {boxes.shape[1]} numbers a row; it needs 4 "
            "(top, left, bottom, right as fractions of the image)"
        )
    return boxes


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor | list[str]]:
    """iter_torch_batches' collate_fn: numeric columns -> tensors, text columns -> list[str]
    (torch has no string tensors; an objective that reads text tokenizes it itself)."""
    return {
        k: list(v) if v.dtype == object or v.dtype.kind in "US" else torch.from_numpy(v)
        for k, v in batch.items()
    }


def to_model_input(images: torch.Tensor, data: DataConfig, *, dtype: torch.dtype) -> torch.Tensor:
    """Integer [B, 1, R, R] images -> normalised float [B, channels, R, R], on their device
    (multi-view studies: [B, V, 1, R, R] -> [B, V, channels, R, R]).

    One pass on the accelerator instead of four on a CPU: (x / max - mean) / std, with the
    grayscale channel repeated where a model takes 3 (ImageNet-style weights).
    """
    if images.ndim == 5:
        flat = to_model_input(images.flatten(0, 1), data, dtype=dtype)
        return flat.unflatten(0, tuple(images.shape[:2]))
    scale = 255.0 if images.dtype == torch.uint8 else 65535.0
    mean = torch.tensor(data.mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    x = images.to(torch.float32)
    if data.channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return ((x / scale - mean) / std).to(dtype)


def _to_integer(images: torch.Tensor, dtype: str) -> np.ndarray:
    top = 255.0 if dtype == "uint8" else 65535.0
    return images.mul(top).round_().clamp_(0, top).numpy().astype(dtype)


def row_keys(image_ids: np.ndarray) -> np.ndarray:
    """int64 key per image id: lets a training worker record what it consumed (strings
    cannot travel in torch batches)."""
    digests = [hashlib.blake2b(str(i).encode(), digest_size=8).digest() for i in image_ids]
    return (
        np.frombuffer(b"".join(digests), dtype="<i8").copy() if digests else np.zeros(0, np.int64)
    )


def _to_unit_float(pixels: np.ndarray) -> torch.Tensor:
    scale = 255.0 if pixels.dtype == np.uint8 else 65535.0
    return torch.from_numpy(pixels.astype(np.float32)).div_(scale)


def _uniform_size(batch: dict[str, np.ndarray]) -> bool:
    return len(_same_size_groups(batch)) <= 1


def _same_size_groups(batch: dict[str, np.ndarray]) -> list[list[int]]:
    """Row indices grouped by (height, width, dtype), groups in order of first appearance."""
    groups: dict[tuple[int, int, str], list[int]] = {}
    for row, shape in enumerate(zip(batch["height"], batch["width"], batch["dtype"], strict=True)):
        groups.setdefault((int(shape[0]), int(shape[1]), str(shape[2])), []).append(row)
    return list(groups.values())


# Streams of a row's generator: the anatomy draw and the augmentation never share numbers.
_SAMPLE, _AUGMENT = 0, 1


def _row_rng(seed: int, epoch: int, key: np.int64 | int, stream: int) -> np.random.Generator:
    """One row's generator: the same (seed, epoch, row) gives the same draws on any worker,
    in any chunk, after any resume."""
    return np.random.default_rng([seed, epoch, int(key) & 0xFFFF_FFFF_FFFF_FFFF, stream])


def _keep_by_anatomy(
    anatomy: np.ndarray, weights: dict[str, float], keys: np.ndarray, seed: int, epoch: int
) -> np.ndarray:
    """Keep each row with probability weight / max weight (anatomies not listed: weight of
    "default", else 1), so an epoch mixes anatomies in the requested proportions."""
    top = max(weights.values())
    default = weights.get("default", 1.0)
    keep_prob = np.array([weights.get(str(a).lower(), default) / top for a in anatomy])
    draws = np.array([_row_rng(seed, epoch, k, _SAMPLE).random() for k in keys])
    return draws < keep_prob if len(keys) else np.zeros(0, dtype=bool)


def _canvas(images: torch.Tensor, fit: str) -> torch.Tensor:
    """[B, 1, H, W] at stored size -> the region `fit` turns into the R x R input: "pad" a
    zero-padded square with the content centred, "crop" the centred square, "stretch" the
    image itself (resized straight to R x R afterwards)."""
    h, w = images.shape[-2:]
    if fit == "stretch" or h == w:
        return images
    if fit == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return images[..., top : top + side, left : left + side]
    side = max(h, w)
    square = images.new_zeros(*images.shape[:-2], side, side)
    top, left = (side - h) // 2, (side - w) // 2
    square[..., top : top + h, left : left + w] = images
    return square


def _canvas_boxes(boxes: np.ndarray, shape: tuple[int, ...], fit: str) -> np.ndarray:
    """Boxes [B, 4] or [B, M, 4] (top, left, bottom, right) in fractions of the stored image
    -> fractions of `_canvas`'s output, clipped to it."""
    h, w = int(shape[0]), int(shape[1])
    if fit == "stretch" or h == w:
        return boxes
    if fit == "crop":  # the square starts `top` rows into the image
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
    else:  # the image starts `-top` rows into the padded square
        side = max(h, w)
        top, left = -((side - h) // 2), -((side - w) // 2)
    y = (boxes[..., [0, 2]] * h - top) / side
    x = (boxes[..., [1, 3]] * w - left) / side
    return np.clip(np.stack([y[..., 0], x[..., 0], y[..., 1], x[..., 1]], axis=-1), 0.0, 1.0)


def _augment(
    canvas: torch.Tensor, cfg: DataConfig, rng: np.random.Generator, boxes: np.ndarray | None
) -> tuple[torch.Tensor, np.ndarray | None]:
    """One [1, 1, H, W] canvas -> [1, 1, R, R]: optional random-resized crop, resize, flip;
    boxes (fractions of the canvas) move with the crop and the flip."""
    h, w = canvas.shape[-2:]
    if cfg.augment.crop_scale is not None:
        top, left, ch, cw = _crop_box(h, w, cfg.augment.crop_scale, rng)
        canvas = canvas[..., top : top + ch, left : left + cw]
        if boxes is not None:
            y = (boxes[..., [0, 2]] * h - top) / ch
            x = (boxes[..., [1, 3]] * w - left) / cw
            boxes = np.clip(np.stack([y[..., 0], x[..., 0], y[..., 1], x[..., 1]], axis=-1), 0, 1)
    image = _resize(canvas, (cfg.batch_side, cfg.batch_side))
    if cfg.augment.hflip and rng.random() < 0.5:
        image = image.flip(-1)
        if boxes is not None:
            boxes = np.stack(
                [boxes[..., 0], 1 - boxes[..., 3], boxes[..., 2], 1 - boxes[..., 1]], axis=-1
            )
    return image, boxes


def augment_and_resize(
    images: torch.Tensor, cfg: DataConfig, rng: np.random.Generator
) -> torch.Tensor:
    """[B, 1, H, W] in [0, 1] -> [B, 1, R, R]: `data.fit`, then optional random-resized crop,
    resize and flip, each image drawing from `rng` in turn."""
    canvas = _canvas(images, cfg.fit)
    return torch.cat([_augment(c[None], cfg, rng, None)[0] for c in canvas])


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    # Antialiasing matters when a 1024-px corpus feeds a 224-px model.
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def _crop_box(
    h: int, w: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box sampling (aspect 3/4..4/3) -> (top, left, height, width);
    the whole image when ten draws miss."""
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = round(np.sqrt(area / aspect)), round(np.sqrt(area * aspect))
        if 0 < ch <= h and 0 < cw <= w:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return 0, 0, h, w
