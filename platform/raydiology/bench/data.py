"""`raydiology bench data`: how fast the corpus format feeds a training worker.

Three measurements in one run, on the same images and the same cores:
- the platform's path: Parquet shards -> Ray Data map_batches -> streaming_split ->
  iter_torch_batches (what a Ray Train worker consumes);
- a baseline: a torch DataLoader reading the same images as PNG files with PIL;
- the ceiling: a bare single-core loop that only decodes the stored format.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console

from raydiology.config import DataConfig


def run_data_benchmark(
    *,
    resolutions: list[int],
    images: int,
    corpus: Path | None,
    batch_size: int,
    cpus: int | None,
    workers: int = 1,
    passes: int = 3,
    decode_pool: Literal["tasks", "actors"] = "tasks",
    console: Console,
) -> list[dict[str, Any]]:
    """One result per resolution; all methods read the same images on the same cores."""
    import ray

    from raydiology.data.corpus import read_manifest, read_rows

    cpus = cpus or os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="raydiology-bench-"))
    if corpus is None:
        from raydiology.data.phantom import write_phantom_corpus

        corpus = work / "corpus"
        stored = max(resolutions)
        console.print(f"making {images} phantom images at {stored}px")
        write_phantom_corpus(corpus, n=images, size=stored, seed=0, progress=False)
    manifest = read_manifest(corpus)
    n = min(images, manifest.rows)
    png_dir = work / "png"
    columns = ["image_id", "pixels", "height", "width", "dtype"]
    _write_pngs(read_rows(corpus, columns=columns), png_dir, n)

    results = []
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        ceiling = _ceiling(corpus, n, passes)  # independent of the output resolution
        console.print(f"ceiling (bare decode of the stored format, 1 core): {ceiling:.1f} img/s")
        for resolution in resolutions:
            data = DataConfig(corpus=str(corpus), resolution=resolution, shuffle_seed=None,
                              decode_batch_size=batch_size, decode_pool=decode_pool)  # fmt: skip
            stage = _decode_stage(data, str(corpus), passes)
            with _PeakMemory() as memory:
                loader = _dataloader(png_dir, data, batch_size, cpus, passes)
                pipeline = _ray_pipeline(data, str(corpus), batch_size, workers, passes)
            console.print(f"{resolution}px: DataLoader+PIL {loader:.1f} img/s, "
                          f"Ray Data {pipeline:.1f} img/s ({cpus} CPUs); its decode stage "
                          f"alone {stage:.1f} img/s (1 core)")  # fmt: skip
            per_core, loader_per_core = pipeline / cpus, loader / cpus
            results.append({
                "resolution": resolution,
                "stored_size": manifest.image_size,
                "images": n,
                "cpus": cpus,
                "workers": workers,
                "batch_size": batch_size,
                "timed_passes": passes,
                "decode_pool": decode_pool,
                "images_per_s": round(pipeline, 2),
                "images_per_s_per_core": round(per_core, 2),
                "dataloader_images_per_s_per_core": round(loader_per_core, 2),
                "ceiling_images_per_s_per_core": round(ceiling, 2),
                # the profile of the gap: the pipeline's own decode work, without Ray
                "decode_stage_images_per_s_per_core": round(stage, 2),
                "ratio_vs_dataloader": round(per_core / loader_per_core, 3),
                "ratio_vs_ceiling": round(per_core / ceiling, 3),
                "peak_memory_mb": round(memory.peak / 2**20, 1),
            })  # fmt: skip
    finally:
        if started_ray:
            ray.shutdown()
    return results


def _decode_stage(data: DataConfig, corpus: str, passes: int) -> float:
    """The pipeline's per-row-group work (`read_row_group`: read, decode, resize, integers
    out) in this process on one core, without Ray: images/s, median of `passes`.

    Between this and the ceiling lies the preprocessing; between this and the Ray Data
    figure lie Ray's object store, the streaming split and the batching into the worker."""
    import pyarrow.parquet as pq

    from raydiology.config_base import to_dict
    from raydiology.data.corpus import read_manifest, shard_paths
    from raydiology.data.pipeline import _PIXEL_COLUMNS, read_row_group

    units = [(str(p), g) for p in shard_paths(corpus)
             for g in range(pq.ParquetFile(p).metadata.num_row_groups)]  # fmt: skip
    settings = {"columns": list(_PIXEL_COLUMNS), "data": to_dict(data), "label_columns": [],
                "out_dtype": read_manifest(corpus).dtype or "uint16"}  # fmt: skip

    def one_pass() -> float:
        done, start = 0, time.perf_counter()
        for path, group in units:
            unit = {"path": np.array([path]), "row_group": np.array([group])}
            done += sum(len(out["image"]) for out in read_row_group(unit, **settings))
        return done / (time.perf_counter() - start)

    one_pass()  # warm-up: imports, page cache
    return statistics.median(one_pass() for _ in range(passes))


def _write_pngs(table, folder: Path, n: int) -> None:
    from PIL import Image

    from raydiology.data.corpus import decode_pixels

    folder.mkdir(parents=True, exist_ok=True)
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    pixels = decode_pixels({k: v[:n] for k, v in batch.items()})
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i:06d}.png")


def _ceiling(corpus: Path, n: int, passes: int) -> float:
    """Bare decode of the stored format on one core: read shards, np.frombuffer, stop
    (median of `passes` passes after a warm-up, like the other methods)."""
    _ceiling_pass(corpus, n)
    return statistics.median(_ceiling_pass(corpus, n) for _ in range(passes))


def _ceiling_pass(corpus: Path, n: int) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydiology.data.corpus import decode_pixels, shard_paths
    from raydiology.data.pipeline import column_arrays

    columns = ["image_id", "pixels", "height", "width", "dtype"]
    start, done = time.perf_counter(), 0
    for path in shard_paths(corpus):
        shard = pq.ParquetFile(path, memory_map=True)  # the pipeline's fastest read
        for batch in shard.iter_batches(batch_size=16, columns=columns, use_threads=False):
            decode_pixels(column_arrays(pa.Table.from_batches([batch]), columns))
            done += batch.num_rows
            if done >= n:
                return done / (time.perf_counter() - start)
    return done / (time.perf_counter() - start)


class _PngDataset(torch.utils.data.Dataset):
    def __init__(self, folder: Path, data: DataConfig) -> None:
        self.paths = sorted(folder.glob("*.png"))
        self.data = data

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        from raydiology.data.pipeline import augment_and_resize

        # The same work as the Ray path: decode, resize, integers out (the training worker
        # normalises on its device either way).
        pixels = np.asarray(Image.open(self.paths[i]).convert("L"))
        if pixels.shape == (self.data.resolution, self.data.resolution):
            return torch.from_numpy(pixels.copy())[None]
        unit = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None, None]
        image = augment_and_resize(unit, self.data, np.random.default_rng())
        return image[0].mul(255).round_().to(torch.uint8)


# Each method makes one warm-up pass (worker processes start, torch imports: seconds that a
# long pretraining run pays once), then `passes` timed passes; the median is quoted. A pass is
# timed from its first batch to its last, so what is measured is the streaming rate a
# million-image epoch sees, not the fraction of a second an epoch of a few hundred images
# spends starting up.


def _timed_passes(make_batches, passes: int) -> float:
    """Median images/s over `passes` iterations of `make_batches()` (after one warm-up)."""
    for _ in make_batches():
        pass
    rates = []
    for _ in range(passes):
        first = done = 0
        start = time.perf_counter()
        for batch in make_batches():
            images = batch["image"] if isinstance(batch, dict) else batch
            if not first:
                first, start = images.shape[0], time.perf_counter()
            done += images.shape[0]
        rates.append((done - first) / max(time.perf_counter() - start, 1e-9))
    return statistics.median(rates)


def _dataloader(folder: Path, data: DataConfig, batch_size: int, cpus: int, passes: int) -> float:
    loader = torch.utils.data.DataLoader(
        _PngDataset(folder, data), batch_size=batch_size, num_workers=cpus, persistent_workers=True
    )
    return _timed_passes(lambda: loader, passes)


def _ray_pipeline(
    data: DataConfig, corpus: str, batch_size: int, workers: int, passes: int
) -> float:
    """Images/s summed over `workers` consumers of a streaming split, as Ray Train has."""
    from concurrent.futures import ThreadPoolExecutor

    from raydiology.data.pipeline import build_dataset

    splits = build_dataset(data, corpus).streaming_split(workers, equal=True)

    def consume(split) -> float:
        return _timed_passes(
            lambda: split.iter_torch_batches(batch_size=batch_size, prefetch_batches=2), passes
        )

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(consume, splits))


class _PeakMemory:
    """Peak memory of this process and all its children (Ray's included).

    Proportional set size (PSS): pages shared between processes, such as Ray's object
    store, count once in total rather than once per process as RSS would.
    """

    def __enter__(self) -> _PeakMemory:
        import psutil

        self.peak = 0
        self._stop = threading.Event()
        me = psutil.Process()

        def measure() -> None:
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a process may just have exited
                    total += getattr(p.memory_full_info(), "pss", 0) or p.memory_info().rss
            self.peak = max(self.peak, total)

        def sample() -> None:
            measure()
            while not self._stop.wait(0.2):
                measure()
            measure()  # a run shorter than the interval still gets a figure

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
