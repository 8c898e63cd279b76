"""Registry-driven tests: every registered model, at its smallest flavor, against every
registered objective that accepts it. A new model or objective gets these for free.

Conventions a registered component follows to take part:
- a model config accepts ``flavor="tiny"`` (its smallest size);
- a model builder takes ``(cfg, *, image_size, in_chans)`` and raises
  ``ConfigError("data.resolution", ...)`` for image sizes it cannot take;
- an objective builder takes ``(cfg, *, model)`` and raises TypeError for models it cannot
  train; its default config works on a batch with just ``"image"`` (else it is skipped here).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from raydiology.config_base import ConfigError, from_dict, to_dict
from raydiology.models import count_parameters
from raydiology.registry import MODELS, OBJECTIVES

IMAGE_SIZES = (64, 56, 112, 128, 224)  # the first one a model accepts is used
IN_CHANS = 1
BATCH = 2


def _tiny_config(name: str):
    cls = MODELS.get(name).config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    assert "flavor" in names, f"model {name!r}: its config needs a `flavor` field (tiny)"
    return from_dict(cls, {"flavor": "tiny"}, "model")


def _build_small(name: str):
    cfg = _tiny_config(name)
    for size in IMAGE_SIZES:
        try:
            torch.manual_seed(0)
            return MODELS.build(name, cfg, image_size=size, in_chans=IN_CHANS), size
        except ConfigError as e:
            if e.key != "data.resolution":
                raise
    pytest.fail(f"model {name!r} accepts none of the image sizes {IMAGE_SIZES}")


def test_builtins_are_registered() -> None:
    assert "hd_mae" in MODELS.names()
    assert "mae" in OBJECTIVES.names()


@pytest.mark.parametrize("name", MODELS.names())
def test_model_config_round_trips(name: str) -> None:
    cfg = _tiny_config(name)
    cls = MODELS.get(name).config_cls
    assert from_dict(cls, to_dict(cfg), "model") == cfg
    assert from_dict(cls, {}, "model") == cls()  # defaults are valid
    with pytest.raises(ConfigError) as err:
        from_dict(cls, {"no_such_key": 1}, "model")
    assert err.value.key == "model.no_such_key"


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_config_round_trips(name: str) -> None:
    cls = OBJECTIVES.get(name).config_cls
    cfg: Any = from_dict(cls, {}, "objective")
    assert from_dict(cls, to_dict(cfg), "objective") == cfg


@pytest.mark.parametrize("name", MODELS.names())
def test_tiny_model_builds_and_counts(name: str) -> None:
    model, _ = _build_small(name)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) > 0
    assert set(counts) == {n for n, _ in model.named_children()} | {"total"}


@pytest.mark.parametrize("objective_name", OBJECTIVES.names())
@pytest.mark.parametrize("model_name", MODELS.names())
def test_forward_backward(model_name: str, objective_name: str) -> None:
    model, size = _build_small(model_name)
    entry = OBJECTIVES.get(objective_name)
    cfg: Any = from_dict(entry.config_cls, {}, "objective")
    try:
        objective = OBJECTIVES.build(objective_name, cfg, model=model)
    except TypeError as e:
        pytest.skip(f"{objective_name} does not train {model_name}: {e}")
    batch = {"image": torch.randn(BATCH, IN_CHANS, size, size)}
    try:
        out = objective(batch)
    except KeyError as e:
        pytest.skip(f"{objective_name} needs batch entries beyond 'image': {e}")
    assert next(iter(out)) == "loss", "objectives return the loss first"
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    for key, value in out.items():
        if key != "loss":
            assert not value.requires_grad, f"log entry {key!r} must be detached"
    loss.backward()
    grads = [p.grad for p in objective.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
