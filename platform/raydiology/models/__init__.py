"""Model builders. Importing this package registers every model in `raydiology.registry.MODELS`.

A new model module registers itself with ``@MODELS.register(name, ConfigCls)`` and is imported
here; its config should accept ``flavor="tiny"`` so the registry-driven tests can build it.

The encoder protocol (what export, `raydiology.load_encoder` and the evaluation yardstick
rely on): a built model has an ``encoder`` module; ``encoder(images [B, C, H, W])`` returns
tokens ``[B, P + N, D]`` with its ``num_prefix_tokens`` P (CLS and the like) first, and the
encoder has ``embed_dim``, ``patch_size`` and ``in_chans``.
"""

from __future__ import annotations

from torch import nn

# Imported to register: HD-MAE, EVA-X, Vision Mamba (MambaXray-VL), DINOv2 (XR-0), report SFT,
# R2Gen.
from raydiology.models import (  # noqa: F401
    clip,
    dinov2,
    eva,
    hd_mae,
    medvill,
    r2gen,
    report_generator,
    vision_mamba,
    vit,
)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level child (by name) plus "total"; buffers are not counted.

    Uses `numel`, so it works on meta-device models. A parameter shared between children is
    counted under each of them but once in "total".
    """
    counts = {
        name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()
    }
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
