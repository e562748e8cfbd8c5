"""Job files for `pum admin create`: task, model_dir, PUM settings under `pum:`, worker `hyperparams`.

    pum admin create presets/tofu/NPO.yaml --set model_dir=/models/target --set pum.rounds_R=4

- Numbers such as `1e-5` are floats (YAML 1.2, as open-unlearning's configs read them; PyYAML's
  YAML 1.1 rules would make them strings).
- `--set KEY=VALUE` overrides the file: `task`, `model_dir`, `pum.NAME`, `hyperparams.NAME`; VALUE
  is read as YAML (`2e-5` a number, `NPO` a string, `[1, 2]` a list).
- open-unlearning's names are accepted (`pum.common.aliases`), per layer: an alias and its PUM name
  in the same layer is an error, a `--set` wins over the file.
- The settings are validated here, with the precedence of DESIGN.md §8 (file < environment) and
  `--set` over both, so a bad value is reported before anything is sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pum.common.aliases import canonical_job
from pum.common.settings import PumSettings

TOP_LEVEL = ("task", "model_dir", "pum", "hyperparams")
SECTIONS = ("pum", "hyperparams")


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` (no dot) as a float, as YAML 1.2 does."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["model_dir=/m", "pum.rounds_R=4"]` → {"model_dir": "/m", "pum": {"rounds_R": 4}}."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not key or (dot and (section not in SECTIONS or not name)) or (not dot and key not in TOP_LEVEL[:2]):
            raise ValueError(f"--set {pair!r}: give task=…, model_dir=…, pum.NAME=… or hyperparams.NAME=…")
        value = read_yaml(raw) if raw else ""
        if dot:
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


def _section(data: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: '{name}' must be a mapping (got {type(value).__name__})")
    return value


def load_job_file(path: Path, environ: Mapping[str, str] | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The job to send: {"task", "model_dir", "pum": validated settings, "hyperparams"} (see the module docstring)."""
    data = read_yaml(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job file is a mapping with {', '.join(TOP_LEVEL)}")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; allowed: {', '.join(TOP_LEVEL)}")
    given = parse_overrides(overrides)
    file_pum, file_hyper = canonical_job(_section(data, "pum", str(path)), _section(data, "hyperparams", str(path)))
    set_pum, set_hyper = canonical_job(given.get("pum", {}), given.get("hyperparams", {}))
    job = {key: given.get(key, data.get(key)) for key in ("task", "model_dir")}
    for key, value in job.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"{path}: '{key}' is required (a string; or --set {key}=…)")
    settings = PumSettings.from_sources(None, environ, file_settings=file_pum, **set_pum)
    return {**job, "pum": settings.to_public_dict(), "hyperparams": {**file_hyper, **set_hyper}}
