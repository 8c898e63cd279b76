"""DeepSpeed checkpoints read back with `torch.load(weights_only=True)`.

DeepSpeed's own engine unpickles checkpoint files with `weights_only=False`, which runs
arbitrary code from a tampered file. We swap in an engine that allows only tensors,
containers and the few DeepSpeed/argparse types its checkpoints hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _allowed_globals() -> list:
    import argparse

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [argparse.Namespace, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, set]


def weights_only_load(path: str, map_location=None):
    with torch.serialization.safe_globals(_allowed_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def weights_only_checkpoint_engine(engine) -> Iterator[None]:
    """Within the block, `engine.load_checkpoint` reads files with weights_only=True."""
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.load
    checkpoint_engine.load = lambda path, map_location=None: weights_only_load(path, map_location)
    try:
        yield
    finally:
        checkpoint_engine.load = original
