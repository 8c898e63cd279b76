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


def param_groups(module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Biases, norms, tokens and position tables take no weight decay (as in MAE/timm).

    A parameter with a `_lr_scale` attribute (e.g. R2Gen's visual extractor, trained at half
    the decoder's rate) goes in a group of its own whose "lr" is `lr` times the scale; the
    schedule then multiplies every group's rate alike. Groups at the base rate come first,
    so the first group's rate is the one the loop logs.
    """
    groups: dict[tuple[float, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = (
            p.ndim <= 1
            or name.endswith(("token", "pos_embed"))
            or ".bias" in name
            or getattr(p, "_no_weight_decay", False)  # e.g. Mamba's A_log and D
        )
        groups.setdefault((float(getattr(p, "_lr_scale", 1.0)), no_decay), []).append(p)
    groups.setdefault((1.0, False), [])  # the decay group always exists, first
    out = []
    for scale, no_decay in sorted(groups, key=lambda k: (k[0] != 1.0, k[0], k[1])):
        params = groups[(scale, no_decay)]
        if not params and (scale, no_decay) != (1.0, False):
            continue
        group: dict = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if scale != 1.0:
            if lr is None:
                raise ValueError("param_groups: parameters with an _lr_scale need the base lr")
            group["lr"] = lr * scale
        out.append(group)
    return out
