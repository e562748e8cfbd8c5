"""Every refused input gets a 4xx with a message and leaves the job's state and S0/S1 unchanged."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load, save



def snapshot(server, job_id: str) -> dict:
    """Everything an upload could change: round sums, copy and lease states, S1 bytes."""
    store = server.service.store
    job = store.job(job_id)
    rnd = store.round(job_id, job.round)
    s1 = server.settings.state_dir / "jobs" / job_id / "rounds" / f"r{job.round}" / rnd.s1_file if rnd.s1_file else None
    return {
        "job": (job.state, job.round), "round": (rnd.s0, rnd.accepted, rnd.s1_file),
        "copies": [(c.k, c.state, c.lease_id) for c in store.copies(job_id, job.round)],
        "leases": sorted((lease.id, lease.state, lease.expires_at) for lease in store.leases(job_id)),
        "s1": hashlib.sha256(s1.read_bytes()).hexdigest() if s1 else None,
        "blobs": sorted(p.relative_to(server.settings.state_dir).as_posix()
                        for p in server.settings.state_dir.rglob("*") if p.is_file()),
    }


@pytest.fixture
def round_in_progress(server, tiny_model_dir):
    """A job with m = 3: one copy accepted, one leased (the lease under test), one pending."""
    job = server.create_job(tiny_model_dir, {"copies_m": 3, "rounds_R": 1})
    worker = server.worker(server.token(job))
    first = worker.post("/v1/work/lease").json()["lease_id"]
    copy = load(worker.get(f"/v1/work/leases/{first}/copy").content)
    good = {n: torch.full(t.shape, 0.01) for n, t in copy.items()}
    assert worker.put(f"/v1/work/leases/{first}/delta", content=save(good)).status_code == 200
    lease = worker.post("/v1/work/lease").json()["lease_id"]
    return {"job": job, "worker": worker, "lease": lease, "done": first, "good": good}


def bad_bodies(good: dict[str, torch.Tensor]) -> dict[str, tuple[bytes, int, str]]:
    """name → (body, expected status, a phrase the message must contain)."""
    name = next(iter(good))
    wrong_shape = {**good, name: torch.zeros(3, 3)}
    nan = {**good, name: torch.full(good[name].shape, float("nan"))}
    half = {n: t.half() for n, t in good.items()}
    renamed = {("x." + n if n == name else n): t for n, t in good.items()}
    missing = {n: t for n, t in good.items() if n != name}
    body = save(good)
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}'
    return {
        "wrong shape": (save(wrong_shape), 400, "shape"),
        "nan": (save(nan), 400, "NaN"),
        "wrong dtype": (save(half), 400, "F16"),
        "unknown name": (save(renamed), 400, "x." + name),
        "missing tensor": (save(missing), 400, name),
        "truncated body": (body[: len(body) - 100], 400, "ended"),
        "malformed header": (struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 64, 400, "JSON"),
        "bad offsets": (struct.pack("<Q", len(header)) + header + b"\0" * 8, 400, "offset"),
        "oversize": (body + b"\0" * 8192, 413, "bytes"),  # over the slack a small __metadata__ may take
        "empty": (b"", 400, "ended"),
    }


@pytest.mark.parametrize("case", list(bad_bodies({"w": torch.zeros(2)})))
def test_bad_upload_is_refused_and_changes_nothing(server, round_in_progress, case):
    body, status, phrase = bad_bodies(round_in_progress["good"])[case]
    before = snapshot(server, round_in_progress["job"])
    response = round_in_progress["worker"].put(f"/v1/work/leases/{round_in_progress['lease']}/delta", content=body)
    assert response.status_code == status, response.text
    assert phrase.lower() in response.json()["detail"].lower()
    assert snapshot(server, round_in_progress["job"]) == before
    # the lease survives a refused upload: a correct one is still taken
    fixed = round_in_progress["worker"].put(
        f"/v1/work/leases/{round_in_progress['lease']}/delta", content=save(round_in_progress["good"])
    )
    assert fixed.status_code == 200


def test_second_upload_on_an_accepted_lease_is_refused(server, round_in_progress):
    before = snapshot(server, round_in_progress["job"])
    response = round_in_progress["worker"].put(
        f"/v1/work/leases/{round_in_progress['done']}/delta", content=save(round_in_progress["good"])
    )
    assert response.status_code == 409 and "once" in response.json()["detail"]
    assert snapshot(server, round_in_progress["job"]) == before


@pytest.mark.parametrize("who, status", [("nobody", 401), ("wrong", 401), ("admin", 401), ("other job", 404)])
def test_upload_with_the_wrong_token_is_refused(server, tiny_model_dir, round_in_progress, who, status):
    other_job = server.create_job(tiny_model_dir, {"copies_m": 2}, task="other")
    headers = {
        "nobody": {}, "wrong": {"Authorization": "Bearer nope"},
        "admin": {"Authorization": f"Bearer {server.settings.admin_token.get_secret_value()}"},
        "other job": {"Authorization": f"Bearer {server.token(other_job)}"},
    }[who]
    before = snapshot(server, round_in_progress["job"])
    response = server.admin.put(
        f"/v1/work/leases/{round_in_progress['lease']}/delta", content=save(round_in_progress["good"]), headers=headers
    )
    assert response.status_code == status and response.json()["detail"]
    assert snapshot(server, round_in_progress["job"]) == before


def test_expired_lease_is_refused_and_its_copy_goes_to_another_worker(server, round_in_progress):
    worker, lease = round_in_progress["worker"], round_in_progress["lease"]
    server.clock.now += server.settings.lease_ttl_s + 1
    second = server.worker(server.token(round_in_progress["job"], "second"))
    regranted = {second.post("/v1/work/lease").json()["lease_id"], second.post("/v1/work/lease").json()["lease_id"]}
    before = snapshot(server, round_in_progress["job"])
    late = worker.put(f"/v1/work/leases/{lease}/delta", content=save(round_in_progress["good"]))
    assert late.status_code == 410 and "expired" in late.json()["detail"]
    assert worker.post(f"/v1/work/leases/{lease}/heartbeat").status_code == 410
    assert snapshot(server, round_in_progress["job"]) == before
    assert len(regranted) == 2 and lease not in regranted  # both remaining copies went to the new worker


def test_heartbeat_keeps_a_lease_alive(server, round_in_progress):
    worker, lease = round_in_progress["worker"], round_in_progress["lease"]
    for _ in range(3):
        server.clock.now += server.settings.lease_ttl_s * 0.8
        assert worker.post(f"/v1/work/leases/{lease}/heartbeat").status_code == 200
    assert worker.put(f"/v1/work/leases/{lease}/delta", content=save(round_in_progress["good"])).status_code == 200


def test_unknown_lease_is_404(server, round_in_progress):
    before = snapshot(server, round_in_progress["job"])
    response = round_in_progress["worker"].put("/v1/work/leases/lease-nope/delta", content=save(round_in_progress["good"]))
    assert response.status_code == 404 and "lease" in response.json()["detail"]
    assert round_in_progress["worker"].get("/v1/work/leases/lease-nope/copy").status_code == 404
    assert snapshot(server, round_in_progress["job"]) == before


def test_worker_token_on_admin_endpoints_is_forbidden(server, round_in_progress):
    worker = round_in_progress["worker"]
    for method, path in [("GET", "/v1/jobs"), ("POST", f"/v1/jobs/{round_in_progress['job']}/abort"),
                         ("POST", f"/v1/jobs/{round_in_progress['job']}/tokens")]:
        response = worker.request(method, path, json={})
        assert response.status_code == 403 and "admin" in response.json()["detail"]
    assert server.admin.get(f"/v1/jobs/{round_in_progress['job']}").json()["state"] == "running"


def test_no_secret_in_what_a_worker_receives(server, round_in_progress):
    """α_k, the job key and the copy index never reach a worker (fuller scan: the reliability issue)."""
    worker = round_in_progress["worker"]
    reply = worker.post("/v1/work/lease").json()
    text = json.dumps(reply)
    job = server.service.store.job(round_in_progress["job"])
    key = server.service.context.key(job.id)
    assert key.hex() not in text and "seed" not in text and '"k"' not in text
    assert all(f"{a:.6f}" not in text for a in server.alphas(job.id))
