"""A copy its workers give back max_copy_failures times fails the job, with their reasons (secrets
redacted, one line each, bounded) in GET /v1/jobs/{id}; `pum admin wait` then exits 4 at once."""

from __future__ import annotations

import json

import pytest

from pum.server.lifecycle import REASON_CHARS, sanitize_reason


def give_back(worker, reason: str) -> int:
    lease = worker.post("/v1/work/lease").json()
    assert lease["status"] == "leased", lease
    assert worker.post(f"/v1/work/leases/{lease['lease_id']}/release", json={"reason": reason}).status_code == 200
    return lease


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_a_copy_given_back_max_copy_failures_times_fails_the_job_with_the_reasons(tmp_path, server_factory,
                                                                                   tiny_model_dir, backend):
    server = server_factory(tmp_path, backend=backend)
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "max_copy_failures": 2})
    worker = server.worker(server.token(job))
    first = give_back(worker, "CUDA out of memory\nAuthorization: Bearer pumw_abc123 was sent")
    status = server.admin.get(f"/v1/jobs/{job}").json()
    assert status["state"] == "running" and status["failure"] is None  # one failure is not enough
    failing_k = next(c["k"] for c in status["rounds"][0]["copies"] if c["failures"] == 1)
    # the other copy may be granted next: give back leases until the same copy failed twice
    while server.admin.get(f"/v1/jobs/{job}").json()["state"] == "running":
        give_back(worker, "retain set missing " + "x" * 1000)
    status = server.admin.get(f"/v1/jobs/{job}").json()
    assert status["state"] == "failed"
    failure = status["failure"]
    assert failure["round"] == 1 and failure["failures"] == 2
    assert failure["reasons"][-1].startswith("retain set missing x") and len(failure["reasons"][-1]) == REASON_CHARS
    if failure["k"] == failing_k:
        assert failure["reasons"][0] == "CUDA out of memory [redacted] [redacted] was sent"
    assert "pumw_abc123" not in json.dumps(status)
    assert f"copy {failure['k']} of round 1 was given back 2 times (max_copy_failures=2)" in status["error"]
    assert worker.post("/v1/work/lease").json() == {"status": "done", "job_state": "failed"}
    assert first["lease_id"]


def test_sanitize_reason_redacts_tokens_and_keeps_one_line():
    assert sanitize_reason("a\nb\x1b[31mc\td") == "a b [31mc d"
    assert sanitize_reason("token pumw_Zz-9_x and bearer abc.def") == "token [redacted] and [redacted]"
    assert len(sanitize_reason("é" * 5000)) == REASON_CHARS


def test_pum_admin_wait_on_a_failed_job_exits_4_with_the_reason(server, tiny_model_dir, monkeypatch, capsys):
    from pum.cli import main

    job = server.create_job(tiny_model_dir, {"copies_m": 2, "max_copy_failures": 1})
    give_back(server.worker(server.token(job)), "no retain set given")
    monkeypatch.setattr("pum.client.cli.http_client", lambda *args, **kwargs: server.admin)
    assert main(["admin", "wait", job, "--no-progress", "--timeout", "5"]) == 4
    out, err = capsys.readouterr()
    assert json.loads(out)["failure"]["reasons"] == ["no retain set given"]
    assert f"job {job} failed: copy" in err and "no retain set given" in err
