"""A trial's frozen-encoder yardstick: probe AUROC and retrieval precision of its export, on a
bounded labelled probe corpus, in a Ray task that reserves what it computes on.

The pretraining corpus can be far larger than a probe needs, and embedding it inside the
trial's actor (which reserves no CPU, and may sit on a head that takes no work) would crowd
whatever node it lands on. So the sweep samples at most `probe.max_images` images once
(`bounded_corpus`, the same rows for every trial), and each trial scores its export on them
in a task holding 1 CPU, or 1 GPU (and a CPU) when the trial trained on GPUs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from raydiology.tune.spec import Plan, ProbeMetricConfig

PROBE_CORPORA = "probe_corpora"  # in the sweep folder: one bounded copy per source corpus


def probe_corpus(plan: Plan, source: str) -> str:
    """The corpus a trial's yardstick reads for `source`: the sweep's bounded copy when
    `source` has more than `probe.max_images` images, else `source` itself."""
    from raydiology.data.corpus import manifest_hash, read_manifest

    probe = plan.config.probe
    cap = probe.max_images if probe is not None else None
    if cap is None or read_manifest(source).rows <= cap:
        return source
    name = f"{manifest_hash(source)[:12]}-{cap}"
    return str(Path(plan.sweep_dir) / PROBE_CORPORA / name)


def _rank(image_id: str) -> bytes:
    """A fixed pseudo-random order of images, from their ids alone."""
    return hashlib.sha256(f"probe:{image_id}".encode()).digest()


def bounded_corpus(source: str, out: str, max_images: int) -> str:
    """Write (once) a corpus of at most `max_images` images of `source`: those whose ids come
    first in a fixed hash order (the same sample on every machine and every rerun), in
    `source`'s order, with all of their columns (labels, split). Only row groups holding a
    chosen image are read."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raydiology.data.corpus import (
        MANIFEST_NAME,
        CorpusWriter,
        manifest_hash,
        read_manifest,
        read_rows,
        shard_paths,
    )

    target = Path(out)
    if (target / MANIFEST_NAME).is_file():
        return out  # made by an earlier run of this sweep
    ids = read_rows(source, columns=["image_id"]).column("image_id").to_pylist()
    chosen = pa.array(sorted(ids, key=_rank)[:max_images], type=pa.string())
    made_by = read_manifest(source).made_by
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    options = {"source": str(source), "max_images": max_images}
    extras = {"source_manifest_sha256": manifest_hash(source)}
    if made_by.get("attribution"):
        extras["attribution"] = made_by["attribution"]
    with CorpusWriter(
        tmp, made_by={"command": "raydiology sweep (probe corpus)", "options": options, **extras}
    ) as writer:
        for path in shard_paths(source):
            shard = pq.ParquetFile(path)
            for group in range(shard.num_row_groups):
                group_ids = shard.read_row_group(group, columns=["image_id"]).column(0)
                mask = pc.is_in(group_ids, value_set=chosen)
                if not pc.any(mask).as_py():
                    continue
                for row in shard.read_row_group(group).filter(mask).to_pylist():
                    pixels = np.frombuffer(row["pixels"], dtype=row["dtype"])
                    writer.add({**row, "pixels": pixels.reshape(row["height"], row["width"])})
    assert writer.manifest is not None and writer.manifest.rows == len(chosen)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first: theirs is the same sample
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / MANIFEST_NAME).is_file():
            raise
    return out


def score_options(scaling: Any) -> dict[str, Any]:
    """Ray options of the scoring task: 1 CPU, plus 1 GPU (of the trial's accelerator type)
    when the trial trained on GPUs. Scheduled on its own ("DEFAULT"), not in the trial's
    placement group, whose driver bundle holds no CPU."""
    options: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "DEFAULT"}
    if scaling.use_gpu:
        options["num_gpus"] = 1
        if scaling.accelerator_type:
            options["accelerator_type"] = scaling.accelerator_type
    return options


def score(
    export: str, probe: ProbeMetricConfig, corpus: str, run_dir: str, use_gpu: bool
) -> dict[str, float | None]:
    """The scoring task's body (see `score_options`)."""
    import torch

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    return yardstick(Path(export), probe, corpus, Path(run_dir), device=device)


def yardstick(
    export: Path, probe: ProbeMetricConfig, corpus: str, run_dir: Path, *, device: str = "cpu"
) -> dict[str, float | None]:
    """The frozen-encoder yardstick of `raydiology evaluate probe` / `retrieval` on the
    trial's export, on `corpus`, from one set of features: probe_auroc (mean test AUROC of an
    MLP probe trained by `probe.protocol`, XR-0's by default), retrieval_precision (mean
    Precision@k of test queries against the train gallery, relevance `probe.match`, XR-0's
    "any" by default) and probe_images (the images embedded). Details go to probe.json and
    retrieval.json in the trial's run directory."""
    from raydiology.data.corpus import read_manifest
    from raydiology.evaluation.features import load_features, resolve_labels
    from raydiology.evaluation.probe import ProbeConfig, fraction_name, probe_features
    from raydiology.evaluation.retrieval import retrieve_features

    columns = resolve_labels(list(probe.labels), read_manifest(corpus).label_columns)
    fs = load_features(
        export, corpus, pooling=probe.pool, cache_dir=run_dir / "probe_features",
        batch_size=probe.batch_size, device=device, progress=False,
    )  # fmt: skip
    caps = {} if probe.max_epochs is None else {"max_epochs": probe.max_epochs}
    pcfg = ProbeConfig.of(probe.protocol, fractions=(probe.fraction,), seeds=probe.seeds, **caps)
    probed = probe_features(fs, columns, pcfg)
    probed["corpus"] = corpus
    (run_dir / "probe.json").write_text(json.dumps(probed, indent=2, default=str))
    retrieved = retrieve_features(fs, columns, ks=(probe.retrieval_k,), match=probe.match)
    (run_dir / "retrieval.json").write_text(json.dumps(retrieved, indent=2, default=str))
    return {
        "probe_auroc": probed["fractions"][fraction_name(probe.fraction)]["auroc_mean"]["mean"],
        "retrieval_precision": retrieved["precision"][str(probe.retrieval_k)],
        "probe_images": float(len(fs.features)),
    }
