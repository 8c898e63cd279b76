"""Name -> builder tables for models and objectives (timm's `create_model` idea).

A component registers itself with the keyword-only config dataclass it accepts, so the
experiment loader can validate a section (unknown keys, bad values) before Ray starts, and
the training loop can build anything from a name without importing a concrete class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config_cls: type
    builder: Callable[..., T]


class Registry(Generic[T]):
    """A table of named builders, each with the config dataclass it takes."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, config_cls: type
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        if not dataclasses.is_dataclass(config_cls):
            raise TypeError(f"{self.kind} {name!r}: config_cls must be a dataclass")

        def decorator(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, config_cls, builder)
            return builder

        return decorator

    def get(self, name: str) -> Entry[T]:
        _import_builtins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def names(self) -> list[str]:
        _import_builtins()
        return sorted(self._entries)

    def build(self, name: str, config: Any, **kwargs: Any) -> T:
        return self.get(name).builder(config, **kwargs)


MODELS: Registry[Any] = Registry("model")
OBJECTIVES: Registry[Any] = Registry("objective")


def _import_builtins() -> None:
    # Importing the packages runs their @register decorators; done lazily so that
    # `import raydiology.registry` stays cheap and free of import cycles.
    from raydiology import models, objectives  # noqa: F401


def build_model(model: Any, data: Any) -> Any:
    """The experiment's model; image size and channels come from the data section."""
    return MODELS.build(
        model.name, model.config, image_size=data.resolution, in_chans=data.channels
    )


def build_objective(objective: Any, model: Any) -> Any:
    """The experiment's objective wrapped around `model` (what DeepSpeed trains)."""
    return OBJECTIVES.build(objective.name, objective.config, model=model)
