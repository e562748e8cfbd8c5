"""Every number a job or the server is given has a lower and an upper bound (so the arithmetic stays
finite and the work proportionate), said in the field's description and in README's bounds table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pum.common.errors import InvalidInput
from pum.common.settings import PumSettings, _num
from pum.server.config import ServerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def range_text(node: dict) -> str:
    """'[2, 64]', '(0, 10]' of a JSON-schema number node."""
    lo = f"[{_num(node['minimum'])}" if "minimum" in node else f"({_num(node['exclusiveMinimum'])}"
    hi = f"{_num(node['maximum'])}]" if "maximum" in node else f"{_num(node['exclusiveMaximum'])})"
    return f"{lo}, {hi}"


def bounded_nodes(node: dict, where: str, strings: bool = True):
    """(where, node) of every number in a property's schema; asserts lists, maps and (with
    `strings`) strings are bounded too."""
    for member in node.get("anyOf", [node]):
        if member.get("type") in ("integer", "number"):
            assert ("minimum" in member or "exclusiveMinimum" in member), f"{where}: no lower bound"
            assert ("maximum" in member or "exclusiveMaximum" in member), f"{where}: no upper bound"
            yield where, member
        elif member.get("type") == "array":
            assert "maxItems" in member, f"{where}: a list without a length bound"
            yield from bounded_nodes(member["items"], where + "[]", strings)
        elif member.get("type") == "object" and "additionalProperties" in member:
            assert "maxProperties" in member, f"{where}: a mapping without a size bound"
            yield from bounded_nodes(member["additionalProperties"], where + "{}", strings)
        elif member.get("type") == "string" and strings:
            assert "maxLength" in member or "enum" in member, f"{where}: a string without a length bound"


def numbers(model) -> dict[str, list[str]]:
    """Field → the range of each number in it, checking every number is bounded on both sides."""
    job = model is PumSettings  # a job's strings come over the network; the server's from its operator
    schema = model.model_json_schema(by_alias=False) if job else model.model_json_schema()
    found = {}
    for name, node in schema["properties"].items():
        ranges = [range_text(n) for _, n in bounded_nodes(node, name, strings=job)]
        if ranges:
            found[name] = ranges
    return found


def test_every_number_of_a_job_is_bounded_and_its_description_says_the_range():
    found = numbers(PumSettings)
    assert {"copies_m", "sigma", "eta_srv", "alpha_max", "noise_kappa", "jitter_tau", "local_epochs"} <= set(found)
    for name, ranges in found.items():
        description = PumSettings.model_fields[name].description
        for text in ranges:
            assert f"in {text}" in description, f"{name}: the description does not say {text}"


def test_every_number_of_the_server_is_bounded():
    found = numbers(ServerSettings)
    assert {"lease_ttl_s", "max_concurrent_copies", "upload_threads", "torch_threads", "port"} <= set(found)


@pytest.mark.parametrize("model", [PumSettings, ServerSettings])
def test_readme_lists_every_bound(model):
    section = README.split("#### Bounds of the settings", 1)[1].split("\n#", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|", section, re.M))
    for name, ranges in numbers(model).items():
        assert rows.get(name) == ", ".join(dict.fromkeys(ranges)), f"README's bound of {name}"


@pytest.mark.parametrize("spec, message", [
    ({"copies_m": 10**6}, "copies_m must be in [2, 64] (got 1000000)"),
    ({"sigma": 1e308}, "sigma must be in [0, 100] (got 1e+308)"),
    ({"eta_srv": 1e308}, "eta_srv must be in (0, 10] (got 1e+308)"),
    ({"alpha_max": 1e300}, "alpha_max must be in [1, 100] (got 1e+300)"),
    ({"rounds_R": 10**9}, "rounds_R must be in [1, 100] (got 1000000000)"),
    ({"local_max_steps": 10**12}, "local_max_steps must be in [1, 1000000] (got 1000000000000)"),
    ({"sigma_per_layer": [0.1] * 5000}, "sigma_per_layer"),
    ({"dp_rdp_orders": [2.0, 1e300]}, "dp_rdp_orders[1] must be ≤ 1000000 (got 1e+300)"),
])
def test_an_out_of_range_setting_is_refused_naming_field_and_range(spec, message):
    with pytest.raises(InvalidInput) as info:
        PumSettings.from_spec(spec)
    assert message in str(info.value)
