"""Frozen-encoder features for the yardstick, computed once per (encoder, corpus, pooling).

Every probe and retrieval run reads the same cached [N, D] matrix, so comparing five probe
seeds and three training fractions costs one forward pass over the corpus. Rows stay in
corpus (manifest) order, which is what makes the splits and the probe's training subsets
identical for every encoder.

Images are prepared exactly like training batches (`data.pipeline.preprocess_batch` without
augmentation, then `to_model_input`): padded to square where sizes differ, resized with
antialiasing, quantised to the corpus's bit depth, normalised with the encoder's own mean/std
and the grey channel repeated for 3-channel encoders.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from raydiology.config import DataConfig

Pooling = Literal["cls", "mean"]
POOLINGS: tuple[str, ...] = ("cls", "mean")
SPLITS = ("train", "val", "test")
# Corpus columns a bias evaluation can split the rows by (docs/corpus_format.md)
GROUP_COLUMNS = ("sex", "age_group")
# Bump when the way images become features changes, so old caches are not reused.
FEATURES_VERSION = 1


@dataclass(kw_only=True)
class FeatureSet:
    """One encoder's pooled features for a whole corpus, with the corpus's labels and splits.

    features [N, D] float32, image_ids [N], split [N] ("train"/"val"/"test"),
    labels [N, L] float32 0/1 for `label_columns` (all `label_*` columns of the corpus),
    groups {column: [N] str or None} for the subgroup columns the corpus has (`GROUP_COLUMNS`).
    """

    features: np.ndarray
    image_ids: np.ndarray
    split: np.ndarray
    labels: np.ndarray
    label_columns: tuple[str, ...]
    encoder: str  # display name
    pooling: str  # what was used ("mean" when "cls" was asked of an encoder without CLS)
    key: dict[str, Any] = field(default_factory=dict)
    cached: bool = False  # True when read from the cache instead of computed
    notes: list[str] = field(default_factory=list)
    groups: dict[str, np.ndarray] = field(default_factory=dict)

    def select(self, columns: list[str] | tuple[str, ...]) -> np.ndarray:
        """labels [N, len(columns)] for the chosen label columns, in the order given."""
        index = [self.label_columns.index(c) for c in columns]
        return self.labels[:, index]


def encoder_name(path: str | os.PathLike) -> str:
    """A short display name: the export folder, or its run folder for `RUN/export`."""
    p = Path(path)
    if p.suffix == ".json":
        p = p.parent
    p = p.resolve()
    return p.parent.name if p.name == "export" else p.name


def parse_encoder_arg(arg: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` -> (display name, path)."""
    name, sep, path = arg.partition("=")
    if sep and name and not Path(arg).exists():
        return name, Path(path)
    return encoder_name(arg), Path(arg)


def resolve_labels(patterns: list[str], available: tuple[str, ...]) -> list[str]:
    """Expand `label_*`-style globs (and plain names) against the corpus's label columns."""
    out: list[str] = []
    for pattern in patterns:
        matched = [c for c in available if fnmatch.fnmatchcase(c, pattern)]
        if not matched:
            raise ValueError(
                f"--label {pattern!r} matches no label column; the corpus has: "
                + (", ".join(available) or "(none)")
            )
        out += [c for c in matched if c not in out]
    return out


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(encoder_dir: Path, corpus_dir: Path, pooling: str) -> dict[str, Any]:
    """What identifies a feature matrix: the encoder's spec and weights, the corpus, pooling.

    The weights are hashed too: two exports of the same config (e.g. two random
    initialisations) have identical specs but different features.
    """
    from raydiology.data.corpus import manifest_hash
    from raydiology.train.export import SPEC, WEIGHTS

    return {
        "version": FEATURES_VERSION,
        "encoder_spec_sha256": hashlib.sha256((encoder_dir / SPEC).read_bytes()).hexdigest(),
        "encoder_weights_sha256": _sha256_file(encoder_dir / WEIGHTS),
        "corpus_manifest_sha256": manifest_hash(corpus_dir),
        "pooling": pooling,
    }


def _cache_paths(cache_dir: Path, key: dict[str, Any]) -> tuple[Path, Path]:
    """Named by the key alone, so renaming an encoder on the command line still hits."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    stem = f"{key['pooling']}-{digest}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pooling: str) -> torch.Tensor:
    """tokens [B, P + N, D] -> [B, D]: "cls" = first prefix token, "mean" = mean of patches."""
    if pooling == "cls":
        if num_prefix_tokens < 1:
            raise ValueError("cls pooling needs a prefix token")
        return tokens[:, 0]
    if pooling == "mean":
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")


def effective_pooling(encoder: nn.Module, pooling: str) -> tuple[str, list[str]]:
    """The pooling that will be used, and a note when it differs from the one asked for."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    if pooling == "cls" and prefix == 0:
        return "mean", ["encoder has no CLS token (num_prefix_tokens == 0): mean-pooled instead"]
    return pooling, []


def _corpus_batches(
    corpus_dir: Path, columns: list[str], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Column batches in manifest order, one Parquet batch at a time (bounded memory)."""
    import pyarrow.parquet as pq

    from raydiology.data.corpus import shard_paths

    for path in shard_paths(corpus_dir):
        for record_batch in pq.ParquetFile(path).iter_batches(
            batch_size=batch_size, columns=columns
        ):
            yield {
                name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in columns
            }


def corpus_table(corpus_dir: str | os.PathLike) -> dict[str, Any]:
    """image_ids [N], split [N], labels [N, L], label columns and subgroup columns
    (`GROUP_COLUMNS` the corpus has, nulls kept as None), in manifest order.

    Rows with no `split` get a fixed split from a hash of their image id (80/10/10), the same
    for every encoder; label nulls are an error (a probe needs every label known).
    """
    from raydiology.data.corpus import CorpusError, read_manifest, read_rows

    manifest = read_manifest(corpus_dir)
    label_columns = tuple(manifest.label_columns)
    groups = [c for c in GROUP_COLUMNS if c in manifest.columns]
    columns = [
        "image_id", *(["split"] if "split" in manifest.columns else []), *label_columns, *groups,
    ]  # fmt: skip
    table = read_rows(corpus_dir, columns=columns)
    image_ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    raw_split = table.column("split").to_pylist() if "split" in columns else [None] * len(image_ids)
    split = np.asarray(
        [s if s is not None else hash_split(i) for s, i in zip(raw_split, image_ids, strict=True)],
        dtype=object,
    )
    labels = np.zeros((len(image_ids), len(label_columns)), dtype=np.float32)
    for j, name in enumerate(label_columns):
        values = table.column(name)
        if values.null_count:
            raise CorpusError(f"{corpus_dir}: {name} has {values.null_count} missing values")
        labels[:, j] = values.to_numpy(zero_copy_only=False)
    return {
        "image_ids": image_ids,
        "split": split,
        "labels": labels,
        "label_columns": label_columns,
        "groups": {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in groups},
        "split_from_hash": int(sum(s is None for s in raw_split)),
    }


def hash_split(image_id: str) -> str:
    """80/10/10 train/val/test from the image id alone (for corpora without a split)."""
    bucket = int.from_bytes(hashlib.sha256(str(image_id).encode()).digest()[:4], "big") % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def encoder_data_config(encoder: nn.Module) -> DataConfig:
    """How an exported encoder wants its images (size, channels, mean/std), from its spec."""
    from raydiology.config import DataConfig

    spec = getattr(encoder, "spec", {})
    data = DataConfig(
        resolution=int(spec["image_size"]),
        channels=int(spec["in_chans"]),
        mean=tuple(spec["mean"]),
        std=tuple(spec["std"]),
    )
    data.validate("encoder.spec")
    return data


@torch.no_grad()
def encode_corpus(
    encoder: nn.Module,
    corpus_dir: str | os.PathLike,
    *,
    pooling: str,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    description: str = "features",
) -> np.ndarray:
    """Run a frozen encoder over every corpus image -> pooled features [N, D] float32."""
    from raydiology.data.corpus import read_manifest
    from raydiology.data.pipeline import preprocess_batch, to_model_input

    data = encoder_data_config(encoder)
    manifest = read_manifest(corpus_dir)
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    encoder = encoder.to(device).eval()
    columns = ["image_id", "pixels", "height", "width", "dtype"]
    out: list[np.ndarray] = []
    with Progress(enabled=progress, description=description, total=manifest.rows) as bar:
        for batch in _corpus_batches(Path(corpus_dir), columns, batch_size):
            images = preprocess_batch(
                batch, data=data, label_columns=[], out_dtype=manifest.dtype or "uint16"
            )["image"]
            x = to_model_input(torch.from_numpy(images).to(device), data, dtype=torch.float32)
            tokens = encoder(x)  # [B, P + N, D]
            out.append(pool_tokens(tokens, prefix, pooling).float().cpu().numpy())
            bar.advance(len(images))
    dim = int(getattr(encoder, "embed_dim", 0) or 0)
    return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)


def load_features(
    encoder_path: str | os.PathLike,
    corpus_dir: str | os.PathLike,
    *,
    pooling: str = "cls",
    cache_dir: str | os.PathLike,
    name: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FeatureSet:
    """Features of one exported encoder on one corpus, from the cache when it has them."""
    from raydiology.train.export import SPEC, load_encoder

    encoder_dir = Path(encoder_path)
    if encoder_dir.suffix == ".json":
        encoder_dir = encoder_dir.parent
    if not (encoder_dir / SPEC).is_file():
        raise FileNotFoundError(f"{encoder_dir}: no {SPEC}; is it an exported encoder?")
    corpus_dir = Path(corpus_dir)
    name = name or encoder_name(encoder_dir)
    table = corpus_table(corpus_dir)
    cache = Path(cache_dir)

    key = cache_key(encoder_dir, corpus_dir, pooling)
    npy, meta_path = _cache_paths(cache, key)
    if npy.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        features = np.load(npy)
        if meta.get("key") == key and len(features) == len(table["image_ids"]):
            if log:
                log(f"{name}: features from cache {npy}")
            return FeatureSet(
                features=features,
                encoder=name,
                pooling=meta["pooling_used"],
                key=key,
                cached=True,
                notes=list(meta.get("notes", [])) + _table_notes(table),
                **_table_fields(table),
            )

    encoder = load_encoder(encoder_dir, device=device)
    used, notes = effective_pooling(encoder, pooling)
    for note in notes:
        if log:
            log(f"{name}: {note}")
    features = encode_corpus(
        encoder,
        corpus_dir,
        pooling=used,
        batch_size=batch_size,
        device=device,
        progress=progress,
        description=f"{name} ({used})",
    )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_suffix(".tmp.npy")
    np.save(tmp, features)
    os.replace(tmp, npy)
    meta = {
        "key": key,
        "encoder": name,
        "encoder_path": str(encoder_dir),
        "corpus": str(corpus_dir),
        "pooling_used": used,
        "shape": list(features.shape),
        "notes": notes,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    if log:
        log(f"{name}: features {features.shape} -> {npy}")
    return FeatureSet(
        features=features,
        encoder=name,
        pooling=used,
        key=key,
        cached=False,
        notes=notes + _table_notes(table),
        **_table_fields(table),
    )


class Progress:
    """A rich progress bar on stderr (stdout stays clean for tables), or nothing."""

    def __init__(self, *, enabled: bool, description: str, total: int) -> None:
        self._bar: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(console=Console(stderr=True))
            self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)


def _table_fields(table: dict[str, Any]) -> dict[str, Any]:
    return {k: table[k] for k in ("image_ids", "split", "labels", "label_columns", "groups")}


def _table_notes(table: dict[str, Any]) -> list[str]:
    n = table["split_from_hash"]
    return [f"{n} rows without a split got one from a hash of their image id"] if n else []
