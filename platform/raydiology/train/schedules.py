"""Learning-rate and weight-decay schedules as pure functions of the optimizer step."""

from __future__ import annotations

import math

from raydiology.config import OptimizerConfig, ScheduleConfig


def lr_factor(step: int, *, schedule: ScheduleConfig, base_lr: float, max_steps: int) -> float:
    """Multiplier on the base learning rate at `step` (LambdaLR convention)."""
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "step":
        return float(schedule.gamma ** (step // schedule.step_size))
    span = max(1, max_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    floor = schedule.min_lr / base_lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def weight_decay_at(step: int, *, optimizer: OptimizerConfig, max_steps: int) -> float:
    """Cosine from `weight_decay` to `weight_decay_end` (DINO/HD-MAE option); else constant."""
    if optimizer.weight_decay_end is None:
        return optimizer.weight_decay
    progress = min(1.0, step / max(1, max_steps))
    start, end = optimizer.weight_decay, optimizer.weight_decay_end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module, weight_decay: float) -> list[dict]:
    """Biases, norms, tokens and position tables take no weight decay (as in MAE/timm)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if (
            p.ndim <= 1
            or name.endswith(("token", "pos_embed"))
            or ".bias" in name
            or getattr(p, "_no_weight_decay", False)  # e.g. Mamba's A_log and D
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
