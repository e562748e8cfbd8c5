"""The registry of inner unlearning methods: a name → method map, filled by `register`.

A method is found by its `name` or any of its `aliases`, case-insensitively (`get_method("IdkDPO")`
is `get_method("DPO")`); `available_methods` lists the canonical names only.

A method registers against its entry in `pum.common.methods_catalog`, what the server checks jobs
with: its name, aliases and parameters (names, kinds, defaults, in order) must be the entry's.
"""

from __future__ import annotations

import dataclasses

from pum.common.methods_catalog import METHODS

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
    mismatch = catalogue_mismatch(cls)
    if mismatch:
        raise ValueError(f"{cls.__qualname__} does not match pum.common.methods_catalog: {mismatch}")
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


def catalogue_mismatch(cls: type[UnlearningMethod]) -> str | None:
    """How the method's name, aliases or Params differ from its catalogue entry (None: they do not)."""
    entry = METHODS.get(cls.name)
    if entry is None:
        return f"no entry named {cls.name!r}"
    if tuple(cls.aliases) != entry.aliases:
        return f"aliases {tuple(cls.aliases)} ≠ {entry.aliases}"
    found = [(f.name, *_kind(f.type), f.default) for f in dataclasses.fields(cls.Params)]
    expected = [(p.name, p.kind, p.optional, p.default) for p in entry.params]
    return None if found == expected else f"parameters {found} ≠ {expected}"


def _kind(annotation) -> tuple[str, bool]:
    """('float', False) for `float`, ('int', True) for `int | None` (a string under postponed annotations)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [part.strip() for part in text.split("|")]
    return next(p for p in parts if p != "None"), "None" in parts


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
