"""The registry of inner unlearning methods: a name → method map, filled by `register`.

A method is found by its `name` or any of its `aliases`, case-insensitively (`get_method("IdkDPO")`
is `get_method("DPO")`); `available_methods` lists the canonical names only.
"""

from __future__ import annotations

import dataclasses

from .base import UnlearningMethod

_METHODS: dict[str, UnlearningMethod] = {}


def register(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    """Class decorator: add a method to the registry under `cls.name` and `cls.aliases` (case-insensitive)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} needs a non-empty string `name`")
    params = getattr(cls, "Params", None)
    if not (dataclasses.is_dataclass(params) and params.__dataclass_params__.frozen):
        raise ValueError(f"{cls.__qualname__}.Params must be a frozen dataclass")
    names = (name, *getattr(cls, "aliases", ()))
    for each in names:
        if not isinstance(each, str) or not each:
            raise ValueError(f"{cls.__qualname__}.aliases must be non-empty strings (got {each!r})")
        key = each.lower()
        if key in _METHODS and type(_METHODS[key]) is not cls:
            raise ValueError(f"an unlearning method named {each!r} is already registered")
    method = cls()
    for each in names:
        _METHODS[each.lower()] = method
    return cls


def available_methods() -> list[str]:
    """The registered method names (not their aliases), sorted."""
    return sorted({method.name for method in _METHODS.values()})


def get_method(name: str) -> UnlearningMethod:
    """The method registered as `name` (case-insensitive); ValueError listing the known names."""
    method = _METHODS.get(name.lower()) if isinstance(name, str) else None
    if method is None:
        aliases = sorted(alias for m in set(_METHODS.values()) for alias in m.aliases)
        also = f" (aliases: {', '.join(aliases)})" if aliases else ""
        raise ValueError(f"unknown unlearning method {name!r}; known methods: {', '.join(available_methods())}{also}")
    return method
