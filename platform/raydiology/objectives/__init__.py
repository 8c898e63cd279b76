"""Training objectives. Importing this package registers each in `raydiology.registry.OBJECTIVES`.

An objective turns a batch into ``{"loss": scalar, <detached logs>...}``; its builder takes
``(cfg, *, model)`` and raises TypeError for a model it cannot train.
"""

from __future__ import annotations

from raydiology.objectives import mae, masking  # noqa: F401  (imported to register)
