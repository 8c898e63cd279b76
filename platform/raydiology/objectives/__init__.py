"""Training objectives. Importing this package registers each in `raydiology.registry.OBJECTIVES`.

An objective turns a batch into ``{"loss": scalar, <detached logs>...}``; its builder takes
``(cfg, *, model)`` and raises TypeError for a model it cannot train.
"""

from __future__ import annotations

# Imported to register: mae (HD-MAE), mfm (EVA-X), arg (MambaXray-VL stage 1),
# dino (DINOv2 / XR-0), report_sft (LLM-decoder report generation).
from raydiology.objectives import (  # noqa: F401
    arg,
    clip,
    dino,
    mae,
    masking,
    medvill,
    medvill_downstream,
    medvill_finetune,
    mfm,
    report_sft,
)
