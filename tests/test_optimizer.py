"""General optimiser options (train.optimizer): layer-wise lr decay, the patch-embedding lr
multiplier, a frozen DINO last layer; and the schedules (train.schedule) as lr curves."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from raydiology.config import OptimizerConfig, ScheduleConfig, TrainConfig
from raydiology.config_base import ConfigError, from_dict
from raydiology.models.dinov2 import DINOv2Config, build_dinov2_vit
from raydiology.models.vision_mamba import VisionMambaConfig, build_vision_mamba
from raydiology.objectives.dino import DINOv2ObjectiveConfig, build_dinov2
from raydiology.train.schedules import lr_factor, lr_scheduler, param_groups

LR = 1e-3


def tiny_dino() -> torch.nn.Module:
    """A 2-block DINOv2 student + head (the objective, as the loop hands it to the optimizer)."""
    torch.manual_seed(0)
    model = build_dinov2_vit(DINOv2Config(flavor="tiny"), image_size=32, in_chans=1)
    return build_dinov2(DINOv2ObjectiveConfig(), model=model)


def multipliers(module: torch.nn.Module, opt: OptimizerConfig | None) -> dict[str, float]:
    """Parameter name -> its group's lr / the base lr."""
    names = {id(p): n for n, p in module.named_parameters()}
    out = {}
    for group in param_groups(module, 0.04, opt):
        for p in group["params"]:
            out[names[id(p)]] = group.get("lr", LR) / LR
    return out


def no_decay_names(module: torch.nn.Module, opt: OptimizerConfig | None) -> set[str]:
    names = {id(p): n for n, p in module.named_parameters()}
    return {
        names[id(p)]
        for g in param_groups(module, 0.04, opt)
        if g["weight_decay"] == 0.0
        for p in g["params"]
    }


def test_defaults_keep_the_plain_decay_and_no_decay_groups() -> None:
    objective = tiny_dino()
    plain = param_groups(objective, 0.04)
    assert [g["weight_decay"] for g in plain] == [0.04, 0.0]
    assert all(set(g) == {"params", "weight_decay"} for g in plain)
    defaults = param_groups(objective, 0.04, OptimizerConfig(lr=LR))
    assert [[id(p) for p in g["params"]] for g in defaults] == [
        [id(p) for p in g["params"]] for g in plain
    ]
    assert all(set(g) == {"params", "weight_decay"} for g in defaults)


def test_layer_decay_follows_depth() -> None:
    objective = tiny_dino()
    opt = OptimizerConfig(lr=LR, layer_decay=0.9)
    mults = multipliers(objective, opt)
    # L = 2 blocks: depth 0 (embeddings, tokens) 0.9^3, block i 0.9^(2-i), the rest 1.
    for name, mult in mults.items():
        if name.startswith("model.encoder.blocks.0."):
            want = 0.9**2
        elif name.startswith("model.encoder.blocks.1."):
            want = 0.9
        elif name.startswith(("model.encoder.patch_embed.", "model.encoder.cls_token",
                              "model.encoder.pos_embed", "model.encoder.mask_token")):  # fmt: skip
            want = 0.9**3
        else:  # the encoder's final norm and the whole DINO head
            assert name.startswith(("model.encoder.norm.", "model.head.")), name
            want = 1.0
        assert mult == pytest.approx(want), name
    # weight decay is untouched by the lr options
    assert no_decay_names(objective, opt) == no_decay_names(objective, None)
    # the logged lr (first group's) is the schedule's
    assert "lr" not in param_groups(objective, 0.04, opt)[0]


def test_patch_embed_lr_mult_touches_only_the_patch_embedding() -> None:
    objective = tiny_dino()
    mults = multipliers(objective, OptimizerConfig(lr=LR, patch_embed_lr_mult=0.2))
    scaled = {n for n, m in mults.items() if m != 1.0}
    assert scaled == {
        "model.encoder.patch_embed.proj.weight",
        "model.encoder.patch_embed.proj.bias",
    }
    assert all(mults[n] == pytest.approx(0.2) for n in scaled)
    # with layer decay on top, the two multiply (DINOv2's get_params_groups_with_decay)
    both = multipliers(objective, OptimizerConfig(lr=LR, layer_decay=0.9, patch_embed_lr_mult=0.2))
    assert both["model.encoder.patch_embed.proj.weight"] == pytest.approx(0.2 * 0.9**3)


def test_vision_mamba_tells_its_depth_through_its_layers() -> None:
    with torch.device("meta"):
        model = build_vision_mamba(VisionMambaConfig(flavor="tiny"), image_size=64, in_chans=1)
    encoder = model.encoder
    depth = encoder.num_layers
    assert depth == len(encoder.layers) >= 2
    assert encoder.layer_id("patch_embed.proj.weight") == 0
    assert encoder.layer_id("pos_embed") == 0
    assert encoder.layer_id("layers.1.mixer.in_proj.weight") == 2
    assert encoder.layer_id("norm.weight") == depth + 1


def test_layer_decay_refuses_a_model_without_depths() -> None:
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(torch.nn.Linear(4, 4), 0.04, OptimizerConfig(layer_decay=0.9))
    with pytest.raises(ValueError, match="last_layer"):
        param_groups(torch.nn.Linear(4, 4), 0.04, OptimizerConfig(freeze_last_layer_steps=1))


def test_frozen_last_layer_takes_no_update_then_trains() -> None:
    """Through torch's AdamW (the optimizer DeepSpeed builds from these groups) and the
    loop's scheduler: lr 0 for the first 3 steps, exactly no change (weight decay too)."""
    objective = tiny_dino()
    train = TrainConfig(
        max_steps=10,
        optimizer=OptimizerConfig(lr=LR, freeze_last_layer_steps=3),
        schedule=ScheduleConfig(name="constant"),
    )
    groups = param_groups(objective, 0.04, train.optimizer)
    (frozen,) = [g for g in groups if g.get("last_layer")]
    last_layer = objective.model.head.last_layer
    assert frozen["params"] == [last_layer.weight_g, last_layer.weight_v]  # gain and directions
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=0.04)
    scheduler = lr_scheduler(optimizer, train)
    last = last_layer.weight_v
    block = objective.model.encoder.blocks[0].attn.qkv.weight
    images = torch.randn(2, 1, 32, 32)
    for step in range(5):
        before_last, before_block = last.detach().clone(), block.detach().clone()
        out = objective({"image": images}, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out["loss"].backward()
        assert last.grad is not None and last.grad.abs().sum() > 0  # it does get a gradient
        optimizer.step()
        scheduler.step()
        assert not torch.equal(block, before_block)  # the rest trains from the first step
        if step < 3:
            assert torch.equal(last, before_last), step
        else:
            assert not torch.equal(last, before_last), step


def test_cosine_restarts_match_torch_warm_restarts() -> None:
    schedule = ScheduleConfig(name="cosine_restarts", restart_steps=4, restart_mult=2, min_lr=0.1)
    # By hand: cycles of 4, 8, 16 steps; each restarts at the full lr.
    half = 0.1 + 0.9 * 0.5  # halfway through a cycle
    for step, want in [(0, 1.0), (2, half), (4, 1.0), (8, half), (12, 1.0), (20, half)]:
        got = lr_factor(step, schedule=schedule, base_lr=1.0, max_steps=100)
        assert got == pytest.approx(want), step

    # torch's CosineAnnealingWarmRestarts (T_0, T_mult, eta_min) step by step, T_mult 1 and 2
    for mult in (1, 2):
        schedule = replace(schedule, restart_mult=mult)
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=2.0)
        ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=4, T_mult=mult, eta_min=0.1
        )
        for step in range(40):
            ours = 2.0 * lr_factor(step, schedule=schedule, base_lr=2.0, max_steps=100)
            assert ours == pytest.approx(optimizer.param_groups[0]["lr"]), (mult, step)
            optimizer.step()
            ref.step()

    # after a warmup the cycles start where the warmup ends
    warm = replace(schedule, warmup_steps=5)
    assert lr_factor(2, schedule=warm, base_lr=1.0, max_steps=100) == pytest.approx(3 / 5)
    for k in range(12):
        assert lr_factor(5 + k, schedule=warm, base_lr=1.0, max_steps=100) == pytest.approx(
            lr_factor(k, schedule=schedule, base_lr=1.0, max_steps=100)
        )
    assert math.isclose(lr_factor(5 + 4, schedule=warm, base_lr=1.0, max_steps=100), 1.0)


def test_optimizer_and_schedule_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="restart_steps"):
        from_dict(ScheduleConfig, {"name": "cosine_restarts"}, "train.schedule")
    with pytest.raises(ConfigError, match="layer_decay"):
        from_dict(OptimizerConfig, {"layer_decay": 1.5}, "train.optimizer")
    with pytest.raises(ConfigError, match="freeze_last_layer_steps"):
        from_dict(OptimizerConfig, {"freeze_last_layer_steps": -1}, "train.optimizer")
