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


@pytest.fixture(scope="session")
def smoke_export():
    """make(experiment, folder, seed, *overrides) -> folder: the smoke flavour of an
    experiment exported with random weights (what `raydiology run` exports at step 0)."""
    import torch

    from raydiology.config import load_experiment
    from raydiology.registry import build_model, build_objective
    from raydiology.train.export import export_encoder

    def make(experiment: str, folder: Path, seed: int, *sets: str) -> Path:
        exp = load_experiment(REPO / "experiments" / experiment, profile="smoke",
                              overrides=list(sets))  # fmt: skip
        torch.manual_seed(seed)
        objective = build_objective(exp.objective, build_model(exp.model, exp.data))
        export_encoder(objective, folder, exp=exp, corpus_sha256=None, step=0)
        return folder

    return make
