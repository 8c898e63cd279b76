"""`raydiology bench memory`: the streaming pipeline's memory stays flat with corpus size.

For each corpus size, a corpus of that many images (tiled from a few phantoms, so that a
million rows cost seconds to write, not hours to render) is streamed through the training
pipeline for several epochs on a Ray started with a small object store. It reports the
peak memory (PSS of this process and Ray's, see `bench.data._PeakMemory`) per epoch: flat
across epochs and across sizes is what bounded memory means, even when the corpus is many
times larger than the object store.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from raydiology.config import DataConfig


def write_tiled_corpus(out: Path, *, n: int, size: int, distinct: int = 16, seed: int = 0) -> Path:
    """`n` rows whose pixels cycle through `distinct` phantoms (ids are all different)."""
    from raydiology.data.corpus import CorpusWriter, progress_iter
    from raydiology.data.phantom import make_phantom

    rng = np.random.default_rng(seed)
    tiles = [make_phantom(rng, size=size).image for _ in range(distinct)]
    with CorpusWriter(out, made_by={"command": "bench memory", "options": {"n": n}},
                      shard_rows=4096, row_group_rows=256) as writer:  # fmt: skip
        for i in progress_iter(range(n), enabled=n > 50_000, description="tiled corpus"):
            writer.add({"image_id": f"tile-{i:08d}", "pixels": tiles[i % distinct]})
    return out


def run_memory_benchmark(
    *,
    sizes: list[int],
    resolution: int,
    epochs: int,
    object_store_mb: int,
    cpus: int,
    batch_size: int = 64,
    console: Console,
) -> list[dict[str, Any]]:
    """One result per corpus size: rows delivered and peak memory of each epoch."""
    import ray

    from raydiology.bench.data import _PeakMemory
    from raydiology.data.pipeline import build_dataset, collate

    if ray.is_initialized():
        raise RuntimeError("bench memory starts its own Ray (small object store); shut Ray down")
    ray.init(num_cpus=cpus, object_store_memory=object_store_mb << 20,
             include_dashboard=False, log_to_driver=False)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    try:
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix="raydiology-mem-") as folder:
                corpus = write_tiled_corpus(Path(folder) / "corpus", n=n, size=resolution)
                corpus_mb = sum(p.stat().st_size for p in corpus.rglob("*.parquet")) / 2**20
                data = DataConfig(corpus=str(corpus), resolution=resolution, shuffle_seed=0)
                dataset = build_dataset(data, str(corpus))
                per_epoch = []
                for epoch in range(epochs):
                    with _PeakMemory() as memory:
                        started, rows = time.perf_counter(), 0
                        for batch in dataset.iter_torch_batches(
                            batch_size=batch_size, collate_fn=collate
                        ):
                            rows += int(batch["image"].shape[0])
                    per_epoch.append({
                        "epoch": epoch,
                        "rows": rows,
                        "seconds": round(time.perf_counter() - started, 1),
                        "peak_memory_mb": round(memory.peak / 2**20, 1),
                    })  # fmt: skip
                    console.print(f"{n} images, epoch {epoch}: {rows} rows, "
                                  f"peak {per_epoch[-1]['peak_memory_mb']} MB")  # fmt: skip
            results.append({
                "images": n,
                "resolution": resolution,
                "corpus_mb": round(corpus_mb, 1),
                "object_store_mb": object_store_mb,
                "epochs": per_epoch,
                "peak_memory_mb": max(e["peak_memory_mb"] for e in per_epoch),
            })  # fmt: skip
    finally:
        ray.shutdown()
    return results
