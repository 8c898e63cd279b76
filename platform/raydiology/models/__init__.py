"""Model builders. Importing this package registers every model in `raydiology.registry.MODELS`.

A new model module registers itself with ``@MODELS.register(name, ConfigCls)`` and is imported
here; its config should accept ``flavor="tiny"`` so the registry-driven tests can build it.
"""

from __future__ import annotations

from torch import nn

from raydiology.models import hd_mae, vit  # noqa: F401  (imported to register)


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
