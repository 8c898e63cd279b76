"""The DeepSpeed engine an experiment's `train` section asks for: config, optimizer, compile.

`training_engine` is the one way a model becomes an engine, for `raydiology run`'s workers
and for `bench step` alike, so the benchmark measures what training runs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from raydiology.config import OptimizerConfig, TrainConfig
from raydiology.train.schedules import lr_scheduler, param_groups


def optimizer_kernel(opt: OptimizerConfig, *, on_gpu: bool) -> str:
    """`opt.kernel` with `auto` resolved (see OptimizerConfig.kernel)."""
    if opt.kernel != "auto":
        return opt.kernel
    if not on_gpu:
        return "torch"
    return "deepspeed_fused" if _fused_adam_prebuilt() else "torch_fused"


def deepspeed_config(train: TrainConfig, *, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config; its optimizer section only when DeepSpeed builds the optimizer
    (torch's fused AdamW is handed to DeepSpeed ready-made, see `training_engine`)."""
    opt = train.optimizer
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip or 0.0,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
        # The loop logs through Ray Train; keep DeepSpeed's own step prints quiet.
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    kernel = optimizer_kernel(opt, on_gpu=on_gpu)
    if kernel != "torch_fused":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                "torch_adam": kernel == "torch",
            },
        }
    return config


def training_engine(objective: torch.nn.Module, train: TrainConfig, ds_config: dict[str, Any]):
    """`deepspeed.initialize` with the experiment's optimizer and LR schedule; BatchNorm
    buffers matched to bf16 weights; repeated blocks compiled with `train.compile`."""
    import deepspeed

    if train.compile:
        compile_blocks(objective)
    groups = param_groups(objective, train.optimizer.weight_decay, train.optimizer)
    optimizer = None
    if "optimizer" not in ds_config:  # torch's fused AdamW: one kernel for all parameters
        opt = train.optimizer
        optimizer = torch.optim.AdamW(
            groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay,
            fused=True,
        )  # fmt: skip
    engine, *_ = deepspeed.initialize(
        model=objective,
        model_parameters=groups if optimizer is None else None,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=lambda opt: lr_scheduler(opt, train),
    )
    match_norm_buffers(engine.module)  # bf16 BatchNorm statistics (ResNet trunks)
    return engine


def compile_blocks(module: torch.nn.Module) -> int:
    """`torch.compile` every block of every `nn.ModuleList` in place (torchtitan's per-block
    compile: small graphs, compiled once and reused by each identical block, parameter names
    unchanged). Returns how many were compiled."""
    compiled = 0
    for child in module.modules():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                block.compile()
                compiled += 1
    return compiled


def prepare_cuda_builds() -> None:
    """On Hopper machines `TORCH_CUDA_ARCH_LIST` often ends in `9.0a`, which DeepSpeed's op
    builder cannot parse; `9.0` builds the same kernels for these ops."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if "9.0a" in arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch.replace("9.0a", "9.0")


def _fused_adam_prebuilt() -> bool:
    """DeepSpeed installed with FusedAdam built (DS_BUILD_FUSED_ADAM=1, as in our image):
    using it costs no JIT build at run time."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get("fused_adam"))


def match_norm_buffers(module: torch.nn.Module) -> None:
    """Give BatchNorm running statistics the dtype of their layer's weights.

    DeepSpeed (0.19) casts parameters to bf16/fp16 but keeps buffers fp32, and batch_norm
    refuses fp32 statistics beside bf16 weights (ResNet trunks: MedViLL, timm encoders).
    Call after `deepspeed.initialize`; a no-op for fp32 and for models without BatchNorm.
    """
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.weight is not None:
            for name in ("running_mean", "running_var"):
                buffer = getattr(layer, name)
                if buffer is not None and buffer.dtype != layer.weight.dtype:
                    setattr(layer, name, buffer.to(layer.weight.dtype))
