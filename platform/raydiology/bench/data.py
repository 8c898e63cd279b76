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
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from raydiology.config import DataConfig


def run_data_benchmark(
    *,
    resolution: int,
    images: int,
    corpus: Path | None,
    batch_size: int,
    cpus: int | None,
    console: Console,
) -> dict[str, Any]:
    import ray

    from raydiology.data.corpus import read_manifest, read_rows

    cpus = cpus or os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="raydiology-bench-"))
    if corpus is None:
        from raydiology.data.phantom import write_phantom_corpus

        corpus = work / "corpus"
        console.print(f"making {images} phantom images at {resolution}px")
        write_phantom_corpus(corpus, n=images, size=resolution, seed=0, progress=False)
    manifest = read_manifest(corpus)
    n = min(images, manifest.rows)

    png_dir = work / "png"
    _write_pngs(
        read_rows(corpus, columns=["image_id", "pixels", "height", "width", "dtype"]), png_dir, n
    )
    data = DataConfig(
        corpus=str(corpus), resolution=resolution, shuffle_seed=None, decode_batch_size=batch_size
    )

    with _PeakMemory() as memory:
        ceiling = _ceiling(corpus, n)
        console.print(f"ceiling (bare decode, 1 core): {ceiling:.1f} img/s")
        loader = _dataloader(png_dir, data, batch_size, cpus)
        console.print(f"DataLoader + PIL ({cpus} workers): {loader:.1f} img/s")
        started_ray = not ray.is_initialized()
        if started_ray:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            pipeline = _ray_pipeline(data, str(corpus), batch_size, n)
        finally:
            if started_ray:
                ray.shutdown()
        console.print(f"Ray Data pipeline ({cpus} CPUs): {pipeline:.1f} img/s")

    per_core = pipeline / cpus
    loader_per_core = loader / cpus
    return {
        "resolution": resolution,
        "images": n,
        "cpus": cpus,
        "batch_size": batch_size,
        "images_per_s": round(pipeline, 2),
        "images_per_s_per_core": round(per_core, 2),
        "dataloader_images_per_s_per_core": round(loader_per_core, 2),
        "ceiling_images_per_s_per_core": round(ceiling, 2),
        "ratio_vs_dataloader": round(per_core / loader_per_core, 3),
        "ratio_vs_ceiling": round(per_core / ceiling, 3),
        "peak_memory_mb": round(memory.peak / 2**20, 1),
    }


def _write_pngs(table, folder: Path, n: int) -> None:
    from PIL import Image

    from raydiology.data.corpus import decode_pixels

    folder.mkdir(parents=True, exist_ok=True)
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    pixels = decode_pixels({k: v[:n] for k, v in batch.items()})
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i:06d}.png")


def _ceiling(corpus: Path, n: int) -> float:
    """Bare decode of the stored format on one core: read shards, np.frombuffer, stop."""
    import pyarrow.parquet as pq

    from raydiology.data.corpus import decode_pixels, shard_paths

    columns = ["image_id", "pixels", "height", "width", "dtype"]
    start, done = time.perf_counter(), 0
    for path in shard_paths(corpus):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=16, columns=columns):
            cols = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in columns}
            decode_pixels(cols)
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

        pixels = np.asarray(Image.open(self.paths[i]).convert("L"), dtype=np.float32) / 255.0
        image = augment_and_resize(
            torch.from_numpy(pixels)[None, None], self.data, np.random.default_rng()
        )
        return ((image[0] - self.data.mean[0]) / self.data.std[0]).contiguous()


def _dataloader(folder: Path, data: DataConfig, batch_size: int, cpus: int) -> float:
    loader = torch.utils.data.DataLoader(
        _PngDataset(folder, data), batch_size=batch_size, num_workers=cpus, persistent_workers=False
    )
    return _time_batches(iter(loader), lambda b: b.shape[0])


def _ray_pipeline(data: DataConfig, corpus: str, batch_size: int, n: int) -> float:
    from raydiology.data.pipeline import build_dataset

    ds = build_dataset(data, corpus)
    (shard,) = ds.streaming_split(1)  # what Ray Train hands one worker
    batches = shard.iter_torch_batches(batch_size=batch_size, prefetch_batches=2)
    return _time_batches(iter(batches), lambda b: b["image"].shape[0])


def _time_batches(batches, count) -> float:
    """Images/s after the first batch (start-up is not throughput)."""
    first = next(batches)
    assert count(first) > 0
    start, done = time.perf_counter(), 0
    for batch in batches:
        done += count(batch)
    elapsed = time.perf_counter() - start
    return done / elapsed if elapsed > 0 else float("nan")


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

        def sample() -> None:
            while not self._stop.wait(0.2):
                total = 0
                for p in [me, *me.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):  # a process may just have exited
                        total += getattr(p.memory_full_info(), "pss", 0) or p.memory_info().rss
                self.peak = max(self.peak, total)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
