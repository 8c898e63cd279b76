"""Shared fixtures: one local Ray for the whole test session (Ray allows one per process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HANNOVER_PNG = SHARED_DATA / "hannover-cxr" / "png"

# DeepSpeed JIT-builds a small CPU op on first use (minutes); keep it between runs.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "raydiology" / "torch_extensions")
)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def hannover_png() -> Path:
    if not HANNOVER_PNG.is_dir():
        pytest.skip(f"real radiographs not found at {HANNOVER_PNG} (../shared/data is absent)")
    return HANNOVER_PNG
