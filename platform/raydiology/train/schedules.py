"""Learning-rate and weight-decay schedules as pure functions of the optimizer step, and
the optimizer's parameter groups (weight decay, layer-wise lr, a frozen DINO last layer)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch

from raydiology.config import OptimizerConfig, ScheduleConfig, TrainConfig


def lr_factor(step: int, *, schedule: ScheduleConfig, base_lr: float, max_steps: int) -> float:
    """Multiplier on the base learning rate at `step` (LambdaLR convention)."""
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "step":
        return float(schedule.gamma ** (step // schedule.step_size))
    floor = schedule.min_lr / base_lr
    if schedule.name == "cosine_restarts":
        assert schedule.restart_steps is not None  # checked by ScheduleConfig.validate
        t, cycle = _restart_position(
            step - schedule.warmup_steps, schedule.restart_steps, schedule.restart_mult
        )
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / cycle))
    span = max(1, max_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _restart_position(step: int, first: int, mult: int) -> tuple[int, int]:
    """(steps into the current cycle, its length): cycles of first, first*mult, ... steps."""
    if mult == 1:
        return step % first, first
    cycle = first  # cycles grow geometrically: a few turns of the loop
    while step >= cycle:
        step -= cycle
        cycle *= mult
    return step, cycle


def weight_decay_at(step: int, *, optimizer: OptimizerConfig, max_steps: int) -> float:
    """Cosine from `weight_decay` to `weight_decay_end` (DINO/HD-MAE option); else constant."""
    if optimizer.weight_decay_end is None:
        return optimizer.weight_decay
    progress = min(1.0, step / max(1, max_steps))
    start, end = optimizer.weight_decay, optimizer.weight_decay_end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


_PATCH_EMBED = re.compile(r"(?:^|\.)patch_embed\.")
_LAST_LAYER = re.compile(r"(?:^|\.)last_layer\.")  # the DINO head's prototypes


def param_groups(
    module: torch.nn.Module, weight_decay: float, optimizer: OptimizerConfig | None = None
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one per (weight decay, lr multiplier, frozen last
    layer). Biases, norms, tokens and position tables take no weight decay (as in MAE/timm).

    With `optimizer`'s layer_decay / patch_embed_lr_mult, or a parameter's `_lr_scale`, a
    group carries its own "lr" (the base lr times its multiplier, as DINOv2's
    `lr_multiplier`); with freeze_last_layer_steps
    the DINO head's last layer sits in a group marked "last_layer" (see `lr_scheduler`).
    Left at their defaults the groups are the plain two: decay, then no decay. Groups at the
    base lr come first, so the lr the loop logs (the first group's) is the schedule's.
    """
    layer_mults = layer_lr_multipliers(module, optimizer.layer_decay if optimizer else 1.0)
    freeze = optimizer is not None and optimizer.freeze_last_layer_steps > 0
    grouped: dict[tuple[bool, bool, float, bool], list[torch.nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = (
            p.ndim <= 1
            or name.endswith(("token", "pos_embed"))
            or ".bias" in name
            or getattr(p, "_no_weight_decay", False)  # e.g. Mamba's A_log and D
        )
        # a parameter's own `_lr_scale` (e.g. R2Gen's visual extractor at half the rate)
        mult = layer_mults.get(name, 1.0) * float(getattr(p, "_lr_scale", 1.0))
        if optimizer is not None and _PATCH_EMBED.search(name):
            mult *= optimizer.patch_embed_lr_mult
        frozen = freeze and _LAST_LAYER.search(name) is not None
        grouped.setdefault((frozen, mult != 1.0, -mult, no_decay), []).append(p)
    if freeze and not any(key[0] for key in grouped):
        raise ValueError(
            "train.optimizer.freeze_last_layer_steps: this objective has no head `last_layer` "
            "(a DINO head's prototypes) to freeze"
        )
    groups = []
    for (frozen, scaled, neg_mult, no_decay), params in sorted(grouped.items()):
        group: dict[str, Any] = {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
        }
        if scaled:
            if optimizer is None:
                raise ValueError("param_groups: parameters with an _lr_scale need the optimizer")
            group["lr"] = optimizer.lr * -neg_mult
        if frozen:
            group["last_layer"] = True
        groups.append(group)
    return groups


def layer_lr_multipliers(module: torch.nn.Module, decay: float) -> dict[str, float]:
    """Parameter name -> decay^(L+1-layer_id) for the parameters of every sub-module that
    tells its depth (`num_layers` and `layer_id(name)`, e.g. `models.vit.LayerIds`); the
    rest (heads, decoders) are not decayed, as DINOv2's head. DINOv2's rule:
    dinov2/utils/param_groups.py, get_vit_lr_decay_rate and get_params_groups_with_decay."""
    if decay == 1.0:
        return {}
    out: dict[str, float] = {}
    for prefix, sub in module.named_modules():
        layer_id = getattr(sub, "layer_id", None)
        if not callable(layer_id):
            continue
        depth = sub.num_layers
        for name, _ in sub.named_parameters():
            full = f"{prefix}.{name}" if prefix else name
            out.setdefault(full, decay ** (depth + 1 - layer_id(name)))
    if not out:
        raise ValueError(
            "train.optimizer.layer_decay: no part of this model tells its layer depth "
            "(a `layer_id(name)` method); set layer_decay 1"
        )
    return out


def lr_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a factor on each group's own lr; a "last_layer" group's factor is 0
    for the first `freeze_last_layer_steps` steps (DINOv2 zeroes its last_layer_lr schedule
    there: dinov2/train/train.py, build_schedulers)."""
    frozen_for = train.optimizer.freeze_last_layer_steps

    def factor(step: int) -> float:
        return lr_factor(
            step, schedule=train.schedule, base_lr=train.optimizer.lr, max_steps=train.max_steps
        )

    def frozen_factor(step: int) -> float:
        return 0.0 if step < frozen_for else factor(step)

    factors: list[Callable[[int], float]] = [
        frozen_factor if group.get("last_layer") else factor for group in optimizer.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
