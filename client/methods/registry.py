"""The registry of inner unlearning methods: a name → method map, filled by `register`."""

from __future__ import annotations

import dataclasses

from .base import UnlearningMethod

_METHODS: dict[str, UnlearningMethod] = {}


def register(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    """Class decorator: add a method to the registry under `cls.name` (case-insensitive)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty string `name`")
    params = getattr(cls, "Params", None)
    if not (dataclasses.is_dataclass(params) and params.__dataclass_params__.frozen):
        raise ValueError(f"{cls.__qualname__}.Params must be a frozen dataclass")
    key = name.lower()
    if key in _METHODS and type(_METHODS[key]) is not cls:
        raise ValueError(f"an unlearning method named {name!r} is already registered")
    _METHODS[key] = cls()
    return cls


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(method.name for method in _METHODS.values())


def get_method(name: str) -> UnlearningMethod:
    """The method registered as `name` (case-insensitive); ValueError listing the known names."""
    method = _METHODS.get(name.lower()) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"unknown unlearning method {name!r}; known methods: {', '.join(available_methods())}")
    return method
