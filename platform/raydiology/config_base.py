"""Turning plain dicts (from YAML) into typed, keyword-only config dataclasses.

Errors name the dotted key, the bad value and what is allowed, so a typo in an experiment
file fails before Ray starts rather than an hour into a run.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, TypeVar, Union

C = TypeVar("C")

# PyYAML follows YAML 1.1, whose float pattern needs a dot and a signed exponent: `1e-4`
# and `+1e3` arrive as strings. Float fields take any decimal float a person would write.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A bad experiment setting: `key` is dotted (e.g. ``objective.masking.inside_ratio``)."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: {value!r} is not allowed; expected {allowed}")


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError unless `condition` holds (used by the configs' `validate`)."""
    if not condition:
        raise ConfigError(key, value, allowed)


def with_overrides(flavor: Any, section: Any) -> dict[str, Any]:
    """A flavor's row (a dataclass of sizes) as a dict, with each field that the config
    `section` sets (not None) in place of the flavor's value."""
    overrides = {
        f.name: getattr(section, f.name)
        for f in dataclasses.fields(flavor)
        if getattr(section, f.name, None) is not None
    }
    return dataclasses.asdict(dataclasses.replace(flavor, **overrides))


def from_dict(cls: type[C], data: Any, key: str) -> C:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields.

    Unknown keys are errors. After construction, a `validate(key)` method, if the class has
    one, checks cross-field rules.
    """
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(key, data, f"a mapping of {cls.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        bad = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ConfigError(bad, data[unknown[0]], f"one of the keys {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else name
        kwargs[name] = _coerce(hints[name], value, sub)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(key)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain dict/list form of a config (tuples become lists), for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:  # `X | None`: X's own error, naming the key inside it
            return _coerce(kinds[0], value, key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(e.allowed)
        raise ConfigError(key, value, " or ".join(errors))
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(key, value, "one of " + ", ".join(repr(a) for a in allowed))
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(key, value, f"a list of {len(args)} values")
            items = [
                _coerce(a, v, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            inner = args[0] if args else Any
            items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is float:  # values only: keys get their own checks
            return {k: _coerce(float, v, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    return value
