"""The real worker loop against the in-process server, and the client's network behaviour."""

from __future__ import annotations

import json

import httpx
import pytest

from pum.client.api import WorkerAPI
from pum.client.worker import Worker, WorkerOptions


def run_worker(server, job, forget, retain, tmp_path, **options) -> Worker:
    api = WorkerAPI(server.worker(server.token(job)))
    worker = Worker(api, forget, retain, WorkerOptions(saves_dir=tmp_path / "saves", progress=False, **options),
                    sleep=lambda s: None)
    worker.run()
    return worker


def test_worker_runs_a_job_to_the_end(server, model_dir, forget_pairs, retain_pairs, tmp_path):
    job = server.create_job(model_dir, {"copies_m": 2, "rounds_R": 2, "inner_handler": "GradDiff", "local_max_steps": 2})
    worker = run_worker(server, job, forget_pairs, retain_pairs, tmp_path)
    assert worker.done == 4 and worker.failed == 0
    assert server.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized"
    folders = sorted(p.name for p in (tmp_path / "saves" / "t1").glob("pum_round*"))
    assert folders == ["pum_round1_copy0", "pum_round1_copy1", "pum_round2_copy0", "pum_round2_copy1"]
    log_lines = (tmp_path / "saves" / "t1" / "pum_round1_copy0" / "train_log.jsonl").read_text().splitlines()
    assert len(log_lines) == 2 and all("loss" in json.loads(line) for line in log_lines)
    metrics = json.loads((tmp_path / "saves" / "t1" / "pum_round2_copy1" / "metrics.json").read_text())
    assert metrics["method"] == "GradDiff" and metrics["train"]["steps"] == 2


def test_a_failing_copy_is_given_back_and_the_worker_stops_after_repeated_failures(
    server, model_dir, forget_pairs, tmp_path
):
    # GradDiff needs a retain set; this worker has none, so every copy fails on the worker's side
    job = server.create_job(model_dir, {"copies_m": 2, "rounds_R": 1, "inner_handler": "GradDiff"})
    with pytest.raises(RuntimeError, match="3 copies failed in a row"):
        run_worker(server, job, forget_pairs, None, tmp_path)
    status = server.admin.get(f"/v1/jobs/{job}").json()
    copies = status["rounds"][0]["copies"]
    assert [c["state"] for c in copies] == ["pending", "pending"]  # offered again
    assert sum(c["failures"] for c in copies) == 3


def test_upload_is_retried_with_backoff_on_transport_errors(tmp_path):
    calls, sleeps = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.read())
        if len(calls) < 3:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"accepted": True})

    delta = tmp_path / "delta.safetensors"
    delta.write_bytes(b"x" * 3000)
    api = WorkerAPI(httpx.Client(transport=httpx.MockTransport(handler), base_url="http://server"), sleep=sleeps.append)
    assert api.upload_delta("lease-1", delta) == {"accepted": True}
    assert sleeps == [1.0, 2.0]
    assert all(body == b"x" * 3000 for body in calls)  # each retry re-sends the whole file


def test_server_refusal_becomes_a_pum_error_with_the_message():
    from pum.common.errors import LeaseExpired

    transport = httpx.MockTransport(lambda r: httpx.Response(410, json={"detail": "lease expired: ask for a new lease"}))
    api = WorkerAPI(httpx.Client(transport=transport, base_url="http://server"))
    with pytest.raises(LeaseExpired, match="ask for a new lease"):
        api.heartbeat("lease-1")
