"""Checkpoints read back safely: DeepSpeed's with `torch.load(weights_only=True)`, other
projects' weight files (teachers, pretrained encoders) with safetensors or weights_only.

DeepSpeed's own engine unpickles checkpoint files with `weights_only=False`, which runs
arbitrary code from a tampered file. We swap in an engine that allows only tensors,
containers and the few DeepSpeed/argparse types its checkpoints hold.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _allowed_globals() -> list:
    import argparse

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [argparse.Namespace, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, set]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors, name -> tensor, on the CPU: `.safetensors` through
    safetensors, anything else through `torch.load(weights_only=True)`.

    Training checkpoints wrap their weights (`{"state_dict": ...}` from Lightning and
    open_clip, `{"model": ...}` from timm/DeiT-style scripts) and DDP prefixes every name with
    `module.`: both are unwrapped, so callers see the model's own names.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path} holds more than tensors (it cannot be read with weights_only=True): "
                "save its state dict alone, e.g. as .safetensors"
            ) from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (names -> tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


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
