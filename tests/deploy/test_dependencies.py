"""pyproject.toml's torch and transformers ranges, the Makefile's CPU pin and the images' torch agree
with the torch minimum that transformers itself declares (deploylint/dependencies.py)."""

from __future__ import annotations

import re

import pytest
from deploylint import REPO
from deploylint.dependencies import (TransformersTorchNeeds, import_gate_min, installed_transformers, project_ranges,
                                     shipped_torch_pins, torch_problems)
from packaging.specifiers import SpecifierSet
from packaging.version import Version


def test_shipped_torch_satisfies_what_transformers_needs():
    needs = installed_transformers()
    assert needs.metadata_min is not None and needs.import_gate_min is not None  # both readers found it
    assert needs.minimum == max(needs.metadata_min, needs.import_gate_min)
    pins = shipped_torch_pins()
    assert set(pins) == {"Makefile TORCH_PIN", "server.Dockerfile TORCH_VERSION", "worker.Dockerfile BASE_IMAGE"}
    assert torch_problems(pins, project_ranges(), needs) == []


def test_the_makefile_keeps_the_cpu_pin():
    assert shipped_torch_pins()["Makefile TORCH_PIN"] == Version("2.13.0")
    assert 'TORCH_VERSION=2.13.0' in (REPO / "deploy" / "server.Dockerfile").read_text()


def test_the_installed_torch_is_what_transformers_uses():
    import torch
    from transformers.utils import is_torch_available

    assert is_torch_available()
    assert Version(torch.__version__.split("+")[0]) >= installed_transformers().minimum


def test_worker_calls_from_pretrained_with_dtype():
    """The reason for transformers' floor: 4.56 is the first release whose from_pretrained takes dtype=."""
    assert re.search(r"from_pretrained\([^)]*\bdtype=", (REPO / "client" / "lease_checks.py").read_text())
    assert project_ranges()["transformers"].contains("4.56.0") and not project_ranges()["transformers"].contains("4.55.4")


GATE_5 = '''
def is_torch_available() -> bool:
    try:
        is_available, torch_version = _is_package_available("torch", return_version=True)
        parsed_version = version.parse(torch_version)
        if is_available and parsed_version < version.parse("2.6.0"):
            logger.warning_once(f"Disabling PyTorch because PyTorch >= 2.6 is required but found {torch_version}")
        return is_available and version.parse(torch_version) >= version.parse("2.6.0")
'''
GATE_4 = '''
_torch_available = False
if USE_TORCH in ENV_VARS_TRUE_AND_AUTO_VALUES and USE_TF not in ENV_VARS_TRUE_VALUES:
    _torch_available, _torch_version = _is_package_available("torch", return_version=True)
    if _torch_available:
        _torch_available = version.parse(_torch_version) >= version.parse("2.1.0")
        if not _torch_available:
            logger.warning(f"Disabling PyTorch because PyTorch >= 2.1 is required but found {_torch_version}")
'''


def test_import_gate_is_read_in_both_forms():
    # transformers 5.x checks in is_torch_available(); 4.56 at import, in a module-level flag.
    assert import_gate_min(GATE_5) == Version("2.6")
    assert import_gate_min(GATE_4) == Version("2.1")
    assert import_gate_min("def is_torch_available():\n    return True\n") is None


NEEDS = TransformersTorchNeeds(Version("5.24.0"), Version("2.6"), Version("2.6.0"))
RANGES = {"torch": SpecifierSet(">=2.6,<3"), "transformers": SpecifierSet(">=4.56,<6")}
PINS = {"Makefile TORCH_PIN": Version("2.13.0"), "server.Dockerfile TORCH_VERSION": Version("2.13.0"),
        "worker.Dockerfile BASE_IMAGE": Version("2.9.0")}


@pytest.mark.parametrize("pins, ranges, needs, expected", [
    # The bug this check is for: a torch 2.5.1 base under a transformers that needs 2.6.
    ({**PINS, "worker.Dockerfile BASE_IMAGE": Version("2.5.1")}, RANGES, NEEDS, "worker.Dockerfile BASE_IMAGE: torch 2.5.1 is below 2.6"),
    (PINS, {**RANGES, "torch": SpecifierSet(">=2.2")}, NEEDS, "admits torch 2.2"),
    (PINS, {**RANGES, "transformers": SpecifierSet(">=4.45")}, NEEDS, "upper bound below the next major"),
    (PINS, RANGES, TransformersTorchNeeds(Version("6.1.0"), Version("2.6"), None), "outside pyproject's range"),
    (PINS, RANGES, TransformersTorchNeeds(Version("5.30.0"), None, Version("2.14")), "below 2.14"),
    ({**PINS, "server.Dockerfile TORCH_VERSION": Version("3.0.0")}, RANGES, NEEDS, "outside pyproject's range '<3,>=2.6'"),
    ({k: v for k, v in PINS.items() if k != "Makefile TORCH_PIN"}, RANGES, NEEDS, "Makefile TORCH_PIN: no torch version found"),
])
def test_torch_problems_caught(pins, ranges, needs, expected):
    assert torch_problems(PINS, RANGES, NEEDS) == []
    problems = torch_problems(pins, ranges, needs)
    assert any(expected in p for p in problems), problems
