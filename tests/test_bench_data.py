"""`raydiology bench data` end to end on tiny phantoms: every method measured on the same
images, the ratios consistent with the figures they are made of."""

from __future__ import annotations

import pytest
from rich.console import Console

from raydiology.bench.data import run_data_benchmark

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("pool", ["tasks", "actors"])
def test_bench_data_measures_pipeline_baseline_ceiling_and_decode_stage(ray_cluster, pool):
    (result,) = run_data_benchmark(
        resolutions=[32], images=24, corpus=None, batch_size=8, cpus=1, passes=1,
        decode_pool=pool, console=Console(quiet=True),
    )  # fmt: skip
    assert result["images"] == 24 and result["decode_pool"] == pool
    rates = ("images_per_s_per_core", "dataloader_images_per_s_per_core",
             "ceiling_images_per_s_per_core", "decode_stage_images_per_s_per_core")  # fmt: skip
    assert all(result[k] > 0 for k in rates)
    per_core = result["images_per_s_per_core"]
    assert result["ratio_vs_dataloader"] == pytest.approx(
        per_core / result["dataloader_images_per_s_per_core"], rel=0.01
    )
    assert result["ratio_vs_ceiling"] == pytest.approx(
        per_core / result["ceiling_images_per_s_per_core"], rel=0.01
    )
    assert result["peak_memory_mb"] > 0
