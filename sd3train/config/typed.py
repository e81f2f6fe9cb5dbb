"""Check a plain config mapping against the dataclass schemas and build typed objects.

OmegaConf's structured configs stop at the first error; users fixing a long override line
want every problem at once, so the walk below collects them all.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

MISSING = "???"


class ConfigError(ValueError):
    """A config that cannot run. `problems` lists every problem as 'key: what is wrong'."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _check_value(value: Any, annotation: Any, key: str, problems: list[str]) -> Any:
    """Return `value` converted to `annotation`, or append a problem and return None."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            problems.append(f"{key}: must not be null")
            return None
        inner = [option for option in options if option is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"schema field {key}: only Optional[X] unions are supported")
        return _check_value(value, inner[0], key, problems)
    if value is None:
        problems.append(f"{key}: must not be null (expected {_type_name(annotation)})")
        return None
    if isinstance(value, str) and value == MISSING:
        problems.append(f"{key}: required value is missing ('???')")
        return None
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, f"{key}.", problems)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return None
        return [_check_value(item, item_type, f"{key}[{i}]", problems) for i, item in enumerate(value)]
    if origin is dict:
        key_type, item_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        return {_check_value(name, key_type, f"{key}.{name}", problems): _check_value(item, item_type, f"{key}.{name}", problems)
                for name, item in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"schema field {key}: unsupported annotation {annotation!r}")
    problems.append(f"{key}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    return None


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{prefix or '<root>'}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key (valid keys of {prefix.rstrip('.') or 'the config'}: "
                            f"{', '.join(sorted(fields))})")
    values = {}
    for name, spec in fields.items():
        key = f"{prefix}{name}"
        if name in data:
            values[name] = _check_value(data[name], hints[name], key, problems)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: required value is missing")
    try:
        return cls(**values)
    except TypeError:  # a required field was missing; already reported
        return None


def build_typed(cls: type, data: dict, prefix: str = "") -> tuple[Any, list[str]]:
    """Typed instance of dataclass `cls` from a plain mapping, plus every problem found."""
    problems: list[str] = []
    instance = _build(cls, data, prefix, problems)
    return instance, problems


def to_plain(instance: Any) -> Any:
    """A typed config back to plain dicts and lists (for YAML and checkpoints)."""
    return dataclasses.asdict(instance)
