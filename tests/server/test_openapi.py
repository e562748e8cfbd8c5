"""The wire contract as the OpenAPI document shows it, and the status ↔ exception table."""

from __future__ import annotations

import httpx
import pytest

from pum.client.api import raise_for_status
from pum.common.errors import BY_STATUS, PumError, error_for_status

BINARY = {"type": "string", "format": "binary"}


def named(schema: dict, components: dict) -> bool:
    """A reply schema that names its shape: a component ($ref), a list or union of components, or bytes."""
    if "$ref" in schema:
        return schema["$ref"].split("/")[-1] in components
    if schema.get("type") == "array":
        return named(schema.get("items", {}), components)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return all(named(s, components) for s in schema[key])
    return schema == BINARY


@pytest.fixture(scope="module")
def openapi(tmp_path_factory):
    from pum.server.app import create_app
    from pum.server.config import ServerSettings

    root = tmp_path_factory.mktemp("openapi")
    return create_app(ServerSettings(state_dir=root / "state", saves_dir=root / "saves", dev_mode=True)).openapi()


def operations(openapi):
    for path, methods in openapi["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def test_every_2xx_and_4xx_reply_names_its_schema(openapi):
    components = openapi["components"]["schemas"]
    unnamed = {}
    for label, operation in operations(openapi):
        for status, reply in operation["responses"].items():
            if status.startswith(("2", "4")):
                schemas = [c.get("schema", {}) for c in reply.get("content", {}).values()] or [{}]
                if not all(named(s, components) for s in schemas):
                    unnamed[f"{label} {status}"] = schemas
    assert not unnamed, unnamed
    assert len(list(operations(openapi))) >= 19


def test_every_route_documents_every_error_of_the_tree_and_no_422(openapi):
    for label, operation in operations(openapi):
        documented = {int(s) for s in operation["responses"] if s.startswith("4")}
        assert documented == {s for s in BY_STATUS if 400 <= s < 500}, label
        assert operation["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in openapi["components"]["schemas"]


def test_the_schemas_name_the_states(openapi):
    components = openapi["components"]["schemas"]
    assert set(components["JobState"]["enum"]) == {"created", "running", "paused", "finalized", "aborted", "failed"}
    assert set(components["CopyState"]["enum"]) == {"pending", "leased", "accepted"}
    assert {"LeaseGranted", "LeaseWait", "LeaseDone", "TaskSpec", "JobStatus", "JobSummary", "RoundInfo", "CopyInfo",
            "TokenIssued", "PrivacyReport", "ErrorBody", "UploadAccepted", "Heartbeat"} <= set(components)


def test_a_request_the_schema_refuses_is_a_400_saying_which_field(server):
    response = server.admin.post("/v1/jobs", json={"task": 3})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "task" in detail and "model_dir" in detail and "Field required" in detail


def test_one_exception_class_per_status_both_ways():
    assert {s: c.__name__ for s, c in BY_STATUS.items()} == {
        400: "InvalidInput", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 408: "RequestTimeout",
        409: "Conflict", 410: "LeaseExpired", 413: "PayloadTooLarge", 416: "RangeNotSatisfiable",
        507: "InsufficientStorage",
    }
    assert all(cls.status == status for status, cls in BY_STATUS.items())
    assert error_for_status(500) is PumError and error_for_status(502) is PumError


@pytest.mark.parametrize("status", sorted(BY_STATUS) + [500, 503])
def test_the_client_raises_the_exception_of_each_status(status):
    request = httpx.Request("PUT", "http://server/v1/work/leases/l/delta")
    response = httpx.Response(status, json={"detail": "what to change"}, request=request)
    with pytest.raises(PumError, match=f"PUT /v1/work/leases/l/delta: {status} what to change") as caught:
        raise_for_status(response)
    assert type(caught.value) is error_for_status(status)


def test_the_wire_privacy_report_has_the_fields_of_the_report():
    """One fact: the wire model names exactly the report's fields, plus the job's id and state."""
    import dataclasses

    from pum.common.privacy.report import PrivacyReport as Report
    from pum.common.schemas import PrivacyReport

    assert set(PrivacyReport.model_fields) == {f.name for f in dataclasses.fields(Report)} | {"job", "state"}
