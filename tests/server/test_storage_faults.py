"""The service over failing storage, and over either backend.

An upload whose blob cannot be written (disk full, a failed fsync or rename) is answered 507 and
changes nothing a later upload depends on: the round keeps its S0 and copy states, the lease stays
live, no partial blob is left, and the same upload retried is accepted once. Kept uploads are
synced with their folder. A whole job gives the same model, byte for byte, on the SQLite +
local-folder backend and on the in-memory one.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from pum.server.blobs import Faults

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def upload_delta(server, worker, lease: str, value: float = 0.01):
    copy = load(worker.get(f"/v1/work/leases/{lease}/copy").content)
    return worker.put(f"/v1/work/leases/{lease}/delta", content=save({n: torch.full(t.shape, value) for n, t in copy.items()}))


def round_state(server, job: str) -> tuple:
    status = server.admin.get(f"/v1/jobs/{job}").json()
    rnd = status["rounds"][0]
    return rnd["accepted"], [(c["state"], c["leases"]) for c in rnd["copies"]]


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
@pytest.mark.parametrize("operation", ["write", "fsync", "rename"])
def test_a_failed_upload_write_is_507_changes_nothing_and_the_upload_is_taken_on_retry(
        tmp_path, tiny_model_dir, server_factory, backend, operation):
    faults = Faults()
    server = server_factory(tmp_path, backend=backend, faults=faults)
    job = server.create_job(tiny_model_dir, {"copies_m": 3, "rounds_R": 1})
    worker = server.worker(server.token(job))
    first = worker.post("/v1/work/lease").json()["lease_id"]
    assert upload_delta(server, worker, first).status_code == 200
    lease = worker.post("/v1/work/lease").json()["lease_id"]
    before = round_state(server, job)

    blob = f"jobs/{job}/rounds/r1/upload_{lease}.safetensors"
    faults.fail(operation, ENOSPC, key=blob)
    unsafe = TestClient(server.admin.app, headers=dict(worker.headers), raise_server_exceptions=False)
    failed = upload_delta(server, unsafe, lease)
    assert failed.status_code == 507 and faults.fired[-1] == (operation, blob), (failed.status_code, faults.fired)
    assert "disk" in failed.json()["detail"]
    assert round_state(server, job) == before
    assert f"upload_{lease}.safetensors" not in server.service.context.files(job).list("rounds/r1")
    assert server.service.store.lease(lease).state == "active"

    body = failed.request.content
    retried = worker.put(f"/v1/work/leases/{lease}/delta", content=body)
    assert retried.status_code == 200 and retried.json()["accepted"]
    assert round_state(server, job)[0] == 2
    assert worker.put(f"/v1/work/leases/{lease}/delta", content=body).status_code == 409  # and counted once


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_an_upload_that_cannot_be_written_is_507_and_leaves_no_trace(
        tmp_path, tiny_model_dir, server_factory, backend):
    faults = Faults()
    server = server_factory(tmp_path, backend=backend, faults=faults)
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1})
    worker = server.worker(server.token(job))
    lease = worker.post("/v1/work/lease").json()["lease_id"]
    faults.fail("write", ENOSPC, key=f"jobs/{job}/rounds/r1/upload_*")
    unsafe = TestClient(server.admin.app, headers=dict(worker.headers), raise_server_exceptions=False)
    assert upload_delta(server, unsafe, lease).status_code == 507
    assert [n for n in server.service.context.files(job).list("rounds/r1") if "upload" in n] == []
    assert not list((tmp_path / "state").rglob(".upload_*"))  # nor a partial one
    assert round_state(server, job)[0] == 0
    assert upload_delta(server, worker, lease).status_code == 200


def test_a_kept_upload_is_synced_with_its_folder(server, tiny_model_dir, monkeypatch):
    """So that after a power loss an accepted upload exists (its directory entry was synced too)."""
    job = server.create_job(tiny_model_dir, {"copies_m": 3, "rounds_R": 1})
    worker = server.worker(server.token(job))
    lease = worker.post("/v1/work/lease").json()["lease_id"]
    synced, real_fsync = [], os.fsync

    def recording(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    assert upload_delta(server, worker, lease).status_code == 200
    kept = server.settings.state_dir / "jobs" / job / "rounds" / "r1" / f"upload_{lease}.safetensors"
    assert kept.stat().st_ino in synced and kept.parent.stat().st_ino in synced


def run_job(server, model_dir) -> dict[str, torch.Tensor]:
    job = server.create_job(model_dir, {"copies_m": 2, "rounds_R": 2, "noise_kappa": 0.05})
    worker = server.worker(server.token(job))
    for value in (0.01, 0.01, 0.02, 0.02):  # one delta per round: the copies are leased in random order
        assert upload_delta(server, worker, worker.post("/v1/work/lease").json()["lease_id"], value).status_code == 200
    assert server.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized"
    return load(server.admin.get(f"/v1/jobs/{job}/model/model.safetensors").content)


def test_both_backends_run_a_job_to_the_same_model(tmp_path, tiny_model_dir, server_factory):
    on_disk = run_job(server_factory(tmp_path / "a"), tiny_model_dir)
    in_memory = run_job(server_factory(tmp_path / "b", backend="memory"), tiny_model_dir)
    assert on_disk.keys() == in_memory.keys()
    for name in on_disk:  # the uploads are summed in the copies' order, whatever order they came in
        assert torch.equal(on_disk[name], in_memory[name]), name
    assert not (tmp_path / "b" / "state").exists()  # the memory backend wrote nothing to disk
