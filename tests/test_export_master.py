"""Exports hold DeepSpeed's fp32 master weights, not the bf16-rounded module weights.

A real DeepSpeed engine trains the tiny HD-MAE in bf16 on the CPU for a few steps (one rank,
gloo, in a fresh process, as DeepSpeed's process group stays there); the exported encoder
is compared with the master copy read independently: zero_to_fp32's consolidation of a
DeepSpeed checkpoint for ZeRO-1/2/3, the FP16 optimizer's fp32 groups for ZeRO-0.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

TRAIN_AND_EXPORT = r"""
import sys
from pathlib import Path

import deepspeed
import torch

from raydiology.config import load_experiment
from raydiology.registry import build_model, build_objective
from raydiology.train.deepspeed_config import deepspeed_config, training_engine
from raydiology.train.export import export_encoder, master_weights

stage, out = int(sys.argv[1]), Path(sys.argv[2])
exp = load_experiment(
    sys.argv[3], profile="smoke",
    overrides=["train.precision=bf16", f"train.zero_stage={stage}", "train.optimizer.lr=3e-3"],
)
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
objective = build_objective(exp.objective, build_model(exp.model, exp.data))
engine = training_engine(objective, exp.train, deepspeed_config(exp.train, world_size=1, on_gpu=False))
images = torch.randn(4, 1, exp.data.resolution, exp.data.resolution).to(torch.bfloat16)
for i in range(3):
    loss = engine({"image": images}, generator=torch.Generator().manual_seed(i))["loss"]
    engine.backward(loss)
    engine.step()

encoder = engine.module.encoder
names = {id(p): n for n, p in engine.module.named_parameters()}  # objective-level names
with deepspeed.zero.GatheredParameters(list(encoder.parameters()), enabled=stage == 3):
    weights = master_weights(engine, encoder)
    export_encoder(engine.module, out / "export", exp=exp, corpus_sha256=None, step=3, weights=weights)
    held = {k: v.detach().float().clone() for k, v in encoder.state_dict().items()}
    module_dtype = str(next(encoder.parameters()).dtype)
torch.save(held, out / "held.pt")

# The master copy, read without master_weights.
if stage == 0:
    opt = engine.optimizer
    by_id = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
    master = {n: by_id[id(p)].detach().float().clone() for n, p in encoder.named_parameters()}
else:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine.save_checkpoint(str(out / "ckpt"), tag="t")
    full = get_fp32_state_dict_from_zero_checkpoint(str(out / "ckpt"), tag="t")
    master = {n: full[names[id(p)]] for n, p in encoder.named_parameters()}
torch.save(master, out / "master.pt")
print("module dtype", module_dtype, "optimizer", type(engine.optimizer).__name__)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_one_rank(script: str, stage: int, out: Path, experiment: str) -> None:
    """`script` STAGE OUT EXPERIMENT as rank 0 of 1 in a fresh process, trained in bf16."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "platform"),
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", script, str(stage), str(out), str(REPO / "experiments" / experiment)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "module dtype torch.bfloat16" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_export_holds_fp32_master_weights(stage: int, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from raydiology.train.export import WEIGHTS

    _run_one_rank(TRAIN_AND_EXPORT, stage, tmp_path, "hd_mae_cam.yaml")

    exported = load_file(str(tmp_path / "export" / WEIGHTS))
    held = torch.load(tmp_path / "held.pt")
    master = torch.load(tmp_path / "master.pt")
    assert exported.keys() == held.keys() and set(master) <= set(exported)
    assert all(t.dtype == torch.float32 for t in exported.values())
    for name, want in master.items():
        torch.testing.assert_close(exported[name], want, rtol=0, atol=0, msg=name)
    # the master copy carries what bf16 rounds away, so it is not the module's weights
    weight = "blocks.0.attn.qkv.weight"
    assert not torch.equal(exported[weight], held[weight])
    assert not torch.equal(exported[weight], exported[weight].bfloat16().float())
    # buffers have no master copy: exported as held (fixed sin-cos positions)
    assert torch.equal(exported["pos_embed"], held["pos_embed"])


EMA_FROM_MASTER = r"""
import sys
from functools import partial
from pathlib import Path

import deepspeed
import torch

from raydiology.config import load_experiment
from raydiology.objectives.dino import momentum_at
from raydiology.registry import build_model, build_objective
from raydiology.train.deepspeed_config import deepspeed_config, training_engine
from raydiology.train.export import master_params

stage, out = int(sys.argv[1]), Path(sys.argv[2])
exp = load_experiment(
    sys.argv[3], profile="smoke",
    overrides=[
        "train.precision=bf16", f"train.zero_stage={stage}", "data.resolution=64",
        "objective.local_crops=2", "train.schedule.name=constant",
        # steps far below bf16's resolution, and a teacher that follows them closely
        "train.optimizer.lr=1e-5", "train.optimizer.freeze_last_layer_steps=0",
        "objective.momentum_teacher=0.5", "objective.momentum_teacher_end=0.5",
    ],
)
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
objective = build_objective(exp.objective, build_model(exp.model, exp.data))
engine = training_engine(objective, exp.train, deepspeed_config(exp.train, world_size=1, on_gpu=False))
student = engine.module.model
names = {id(p): n for n, p in engine.module.named_parameters()}  # objective-level names


def masters(step):
    # The master copy, read without master_params (as in TRAIN_AND_EXPORT).
    opt = engine.optimizer
    if stage == 0:
        by_id = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
        read = lambda p: by_id[id(p)]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        engine.save_checkpoint(str(out / "ckpt"), tag=f"t{step}")
        full = get_fp32_state_dict_from_zero_checkpoint(str(out / "ckpt"), tag=f"t{step}")
        read = lambda p: full[names[id(p)]]
    return {
        f"{prefix}.{n}": read(p).detach().float().reshape(p.shape).clone()
        for prefix in ("encoder", "head") for n, p in getattr(student, prefix).named_parameters()
    }


teacher = engine.module.teacher
from_master = {k: v.clone() for k, v in teacher.state_dict().items()}
from_module = {k: v.clone() for k, v in teacher.state_dict().items()}
images = torch.randn(4, 3, 64, 64).to(torch.bfloat16)
steps = 3
for step in range(1, steps + 1):
    loss = engine({"image": images}, generator=torch.Generator().manual_seed(step))["loss"]
    engine.backward(loss)
    engine.step()
    engine.module.after_step(step, steps, partial(master_params, engine))  # as the loop does
    m = momentum_at(step - 1, steps, start=0.5, end=0.5)
    for k, v in masters(step).items():
        from_master[k].lerp_(v, 1 - m)
    module = {f"{p}.{n}": w for p in ("encoder", "head") for n, w in getattr(student, p).named_parameters()}
    for k, v in module.items():
        from_module[k].lerp_(v.detach().float(), 1 - m)
torch.save({"teacher": teacher.state_dict(), "from_master": from_master, "from_module": from_module}, out / "ema.pt")
print("module dtype", next(student.parameters()).dtype, "optimizer", type(engine.optimizer).__name__)
"""


@pytest.mark.parametrize("stage", [0, 2])
def test_dino_teacher_follows_the_fp32_master_weights(stage: int, tmp_path: Path) -> None:
    """DINOv2's EMA teacher (through the loop's `after_step(..., master_params)`) tracks
    DeepSpeed's fp32 master copy of the bf16 student, not the rounded module weights."""
    pytest.importorskip("deepspeed")
    _run_one_rank(EMA_FROM_MASTER, stage, tmp_path, "xr0_dinov2.yaml")
    ema = torch.load(tmp_path / "ema.pt")
    teacher, from_master, from_module = ema["teacher"], ema["from_master"], ema["from_module"]
    assert teacher.keys() == from_master.keys()
    assert all(t.dtype == torch.float32 for t in teacher.values())
    for name, want in from_master.items():
        torch.testing.assert_close(teacher[name], want, rtol=0, atol=1e-7, msg=name)
    # an EMA of the bf16 module weights is another teacher: bf16 rounds the 1e-5 steps away
    for name in ("encoder.blocks.0.attn.qkv.weight", "head.mlp.0.weight", "encoder.norm.weight"):
        gap = (teacher[name] - from_module[name]).abs().max()
        assert gap > 1e-6, (name, gap)
