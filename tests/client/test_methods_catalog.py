"""The catalogue the server checks jobs with (pum.common.methods_catalog) is the client's registry:
every registered method matches its entry, every entry is registered, their retain rules agree, the
trainer's keys are TrainConfig's, and a method that drifts from its entry cannot register."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from pum.client.methods import available_methods, get_method, parse_params, register
from pum.client.methods.base import RETAIN_LOSSES
from pum.client.methods.registry import catalogue_mismatch
from pum.client.trainer import TRAINER_KEYS, TrainConfig
from pum.common import methods_catalog
from pum.common.methods_catalog import METHODS, TRAINER_PARAMS


def test_every_registered_method_matches_its_entry_and_every_entry_is_registered():
    assert sorted(METHODS) == available_methods()
    for name, entry in METHODS.items():
        method = get_method(name)
        assert catalogue_mismatch(type(method)) is None
        assert method.name == entry.name and method.aliases == entry.aliases
        for alias in entry.aliases:
            assert get_method(alias) is method and methods_catalog.find_method(alias.upper()) is entry


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_retain_rule_is_the_methods_own(name):
    entry, method = METHODS[name], get_method(name)
    weights = [{}] + ([{entry.retain_weight: 0.0}, {entry.retain_weight: 0.5}] if entry.retain_weight else [])
    for values in weights:
        assert entry.needs_retain(values) == method.uses_retain(parse_params(method, values)), values


def test_the_trainer_keys_are_train_configs():
    assert tuple(p.name for p in TRAINER_PARAMS) == TRAINER_KEYS
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for param in TRAINER_PARAMS:
        field = fields[param.name]
        assert field.default == param.default, param.name
        assert (field.type.split(" | ")[0], "None" in field.type) == (param.kind, param.optional), param.name
    choices = {p.name: p.choices for p in TRAINER_PARAMS if p.choices}
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(method="NPO", optimizer="adam")
    for name, values in choices.items():
        for value in values:
            TrainConfig(method="NPO", **{name: value})  # every choice the catalogue allows, the trainer takes
    retain_loss = next(p for p in METHODS["NPO"].params if p.name == "retain_loss")
    assert retain_loss.choices == RETAIN_LOSSES


def test_a_method_that_drifts_from_its_entry_cannot_register():
    npo = type(get_method("NPO"))

    @dataclasses.dataclass(frozen=True)
    class Params:
        beta: float = 0.2  # the catalogue says 0.1
        gamma: float = 1.0
        alpha: float = 1.0
        retain_loss: str = "nll"

    drifted = type("DriftedNPO", (npo,), {"Params": Params})
    with pytest.raises(ValueError, match="does not match pum.common.methods_catalog: parameters"):
        register(drifted)
    unknown = type("Unknown", (npo,), {"name": "Unknown"})
    with pytest.raises(ValueError, match="no entry named 'Unknown'"):
        register(unknown)
    assert get_method("NPO") is not None and type(get_method("NPO")) is npo


def test_neither_the_server_nor_common_imports_the_client():
    """DESIGN.md §1: server → common ← client (every import statement, lazy ones included)."""
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in [*(root / "server").rglob("*.py"), *(root / "common").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith("pum.client")]
    assert offenders == []
