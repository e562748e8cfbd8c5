"""Do the torch builds we ship satisfy the torch that transformers needs?

transformers declares its torch minimum twice: in its metadata (`Requires-Dist: torch>=X; extra ==
"torch"`, not enforced by `pip install transformers`) and in its source, where `is_torch_available()`
answers False below the minimum: a worker with an older torch installs cleanly and then fails on
every copy. So the torch of each place that pins one (the Makefile's CPU pin, the server image,
the worker's base image) must satisfy pyproject.toml's torch range, and that range's floor must
be at least the minimum of the transformers versions pyproject.toml allows.

The minimum is read from the transformers installed here, which must be an allowed version; over
its history the minimum only rose, so the newest allowed release (the one pip picks) is the one
to check, and a release that raises it fails this check on the next `make venv`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from . import REPO


@dataclass(frozen=True)
class TransformersTorchNeeds:
    """What one transformers release says about torch."""

    version: Version  # the transformers release
    metadata_min: Version | None  # from Requires-Dist: torch>=X; extra == "torch"
    import_gate_min: Version | None  # where transformers/utils/import_utils.py switches PyTorch off

    @property
    def minimum(self) -> Version:
        found = [v for v in (self.metadata_min, self.import_gate_min) if v is not None]
        if not found:
            raise ValueError(f"transformers {self.version}: found no torch minimum in its metadata or source")
        return max(found)


def project_ranges(pyproject: Path = REPO / "pyproject.toml") -> dict[str, SpecifierSet]:
    """The version range of each runtime dependency in pyproject.toml, by name."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d).specifier for d in deps}


def lower_bound(spec: SpecifierSet) -> Version | None:
    bounds = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
    return max(bounds) if bounds else None


def installed_transformers() -> TransformersTorchNeeds:
    """The torch minimum of the transformers installed here, from its metadata and its import gate."""
    dist = metadata.distribution("transformers")
    metadata_min = None
    for line in dist.requires or []:
        req = Requirement(line)
        if req.name == "torch" and req.marker is not None and req.marker.evaluate({"extra": "torch"}):
            metadata_min = lower_bound(req.specifier)
    source = Path(dist.locate_file("transformers/utils/import_utils.py")).read_text()
    return TransformersTorchNeeds(Version(dist.version), metadata_min, import_gate_min(source))


def import_gate_min(import_utils_source: str) -> Version | None:
    """The version below which transformers switches PyTorch off, from the warning it logs then.

    The check moved between releases (a module-level flag in 4.x, `is_torch_available()` in 5.x);
    its message, "Disabling PyTorch because PyTorch >= X is required", is the same in both.
    """
    found = re.search(r"Disabling PyTorch because PyTorch >= ([\d.]+) is required", import_utils_source)
    return Version(found.group(1)) if found else None


def shipped_torch_pins(repo: Path = REPO) -> dict[str, Version]:
    """The torch each build ships, by where it is set: Makefile pin, server image, worker base image."""
    pins = {}
    make = re.search(r"^TORCH_PIN \?= torch==([\w.]+)", (repo / "Makefile").read_text(), re.M)
    if make:
        pins["Makefile TORCH_PIN"] = Version(make.group(1))
    server = re.search(r"^ARG TORCH_VERSION=([\w.]+)", (repo / "deploy" / "server.Dockerfile").read_text(), re.M)
    if server:
        pins["server.Dockerfile TORCH_VERSION"] = Version(server.group(1))
    base = re.search(r"^ARG BASE_IMAGE=\S+:(\d+\.\d+(?:\.\d+)?)-", (repo / "deploy" / "worker.Dockerfile").read_text(), re.M)
    if base:
        pins["worker.Dockerfile BASE_IMAGE"] = Version(base.group(1))
    return pins


def torch_problems(pins: dict[str, Version], ranges: dict[str, SpecifierSet], needs: TransformersTorchNeeds) -> list[str]:
    """Each pinned torch is in pyproject's range and at or above transformers' minimum; the ranges agree."""
    problems = []
    for where in ("Makefile TORCH_PIN", "server.Dockerfile TORCH_VERSION", "worker.Dockerfile BASE_IMAGE"):
        if where not in pins:
            problems.append(f"{where}: no torch version found (the pattern this check reads has changed?)")
    torch_range, transformers_range = ranges.get("torch", SpecifierSet()), ranges.get("transformers", SpecifierSet())
    if needs.version not in transformers_range:
        problems.append(f"the installed transformers {needs.version} is outside pyproject's range "
                        f"'{transformers_range}': its torch minimum says nothing about the allowed versions")
    for name, spec in (("torch", torch_range), ("transformers", transformers_range)):
        if lower_bound(spec) is None or not any(s.operator == "<" for s in spec):
            problems.append(f"pyproject: {name} '{spec}' needs a lower bound and an upper bound below the next major")
    floor = lower_bound(torch_range)
    if floor is not None and floor < needs.minimum:
        problems.append(f"pyproject: torch '{torch_range}' admits torch {floor}, but transformers {needs.version} "
                        f"needs torch>={needs.minimum} (below it, it switches PyTorch off)")
    for where, version in pins.items():
        if version not in torch_range:
            problems.append(f"{where}: torch {version} is outside pyproject's range '{torch_range}'")
        if version < needs.minimum:
            problems.append(f"{where}: torch {version} is below {needs.minimum}, the minimum of transformers "
                            f"{needs.version}: transformers would switch PyTorch off")
    return problems
