"""The DeepSpeed config generated from an experiment's `train` section."""

from __future__ import annotations

from typing import Any

import torch

from raydiology.config import TrainConfig


def deepspeed_config(
    train: TrainConfig, *, world_size: int, on_gpu: bool, torch_adam: bool | None = None
) -> dict[str, Any]:
    """`torch_adam` None: FusedAdam on GPUs (JIT-built with nvcc), torch's AdamW elsewhere."""
    opt = train.optimizer
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip or 0.0,
        "zero_optimization": {"stage": train.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": list(opt.betas),
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                # FusedAdam needs a CUDA build; torch's AdamW runs everywhere.
                "torch_adam": (not on_gpu) if torch_adam is None else torch_adam,
            },
        },
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
        # The loop logs through Ray Train; keep DeepSpeed's own step prints quiet.
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


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
