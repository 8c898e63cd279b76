"""raydiology: an experiment platform on Ray for X-ray foundation models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_encoder", "load_experiment"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import raydiology` does not pull in torch, Ray or DeepSpeed.
    if name == "load_encoder":
        from raydiology.train.export import load_encoder

        return load_encoder
    if name == "load_experiment":
        from raydiology.config import load_experiment

        return load_experiment
    raise AttributeError(name)
