"""The request gate (server/gate.py) in process: JSON bodies capped and checked for a token before
they are read; the streamed upload route is left to bound its own body. The real-socket cases
(a body announced but never sent, half-sent requests) are in tests/security/test_denial_of_service.py."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from pum.server.gate import STREAMED


def test_a_json_body_over_the_cap_is_refused_with_what_to_change(server_factory, tmp_path, tiny_model_dir):
    server = server_factory(tmp_path, max_json_body_bytes=4096)
    body = {"task": "t", "model_dir": str(tiny_model_dir), "pum": {}, "hyperparams": {"pad": "x" * 5000}}
    refused = server.admin.post("/v1/jobs", json=body)
    assert refused.status_code == 413 and "over 4096 bytes" in refused.json()["detail"]
    assert refused.headers["connection"] == "close"
    assert server.service.store.jobs() == []  # nothing stored
    body["hyperparams"] = {"lr": 1e-3}
    assert server.admin.post("/v1/jobs", json=body).status_code == 201


def test_a_body_without_a_known_token_is_refused_before_the_route_parses_it(server, tiny_model_dir):
    anonymous = TestClient(server.admin.app)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        refused = anonymous.post("/v1/jobs", content=b"{not json", headers=headers)
        assert refused.status_code == 401 and "body was not read" in refused.json()["detail"]
    # with the admin token the same body reaches the route, which refuses it as bad JSON
    assert server.admin.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
                             ).status_code == 400


def test_the_upload_route_takes_bodies_past_the_json_cap(server_factory, tmp_path, tiny_model_dir):
    server = server_factory(tmp_path, max_json_body_bytes=4096)
    job = server.create_job(tiny_model_dir, {"copies_m": 2})
    worker = server.worker(server.token(job))
    lease = worker.post("/v1/work/lease").json()["lease_id"]
    reply = worker.put(f"/v1/work/leases/{lease}/delta", content=b"\0" * 20000)
    assert reply.status_code == 400 and "send a safetensors file" in reply.json()["detail"]  # the upload's own check


def test_every_streamed_pattern_names_a_route(server):
    paths = server.admin.app.openapi()["paths"]
    for method, pattern in STREAMED:
        concrete = [re.sub(r"\{[^}]+\}", "x", p) for p, ops in paths.items() if method.lower() in ops]
        assert any(pattern.fullmatch(p) for p in concrete), (method, pattern.pattern)
