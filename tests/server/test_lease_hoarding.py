"""Lease hoarding: a maximum lease age that heartbeats cannot pass, the admin's lease revocation and
token revocation (routes, AdminAPI and `pum admin revoke-lease|revoke-token`)."""

from __future__ import annotations

import json

import pytest

from pum.client.admin import AdminAPI
from pum.common.errors import NotFound
from pum.common.states import CopyState, LeaseState


def copies(server, job):
    return server.admin.get(f"/v1/jobs/{job}").json()["rounds"][0]["copies"]


def test_a_lease_ends_at_its_maximum_age_however_often_it_beats(server_factory, tmp_path, tiny_model_dir):
    server = server_factory(tmp_path, lease_ttl_s=30, lease_max_age_s=100)
    job = server.create_job(tiny_model_dir, {"copies_m": 2})
    hoarder, honest = server.worker(server.token(job, "hoarder")), server.worker(server.token(job, "honest"))
    leases = [hoarder.post("/v1/work/lease").json()["lease_id"] for _ in range(2)]
    assert honest.post("/v1/work/lease").json()["status"] == "wait"
    ttls = []
    for _ in range(4):  # 80 s of heartbeats every 20 s: the lease lives
        server.clock.now += 20
        beats = [hoarder.post(f"/v1/work/leases/{lease}/heartbeat") for lease in leases]
        assert all(b.status_code == 200 for b in beats)
        ttls.append(beats[0].json()["ttl_s"])
    assert ttls == [30, 30, 30, 20]  # the last renewal reaches only to the maximum age
    server.clock.now += 20.5
    late = hoarder.post(f"/v1/work/leases/{leases[0]}/heartbeat")
    assert late.status_code == 410 and "maximum lease age 100 s" in late.json()["detail"]
    assert all(c["state"] == CopyState.PENDING for c in copies(server, job))  # offered again
    assert honest.post("/v1/work/lease").json()["status"] == "leased"


def test_the_admin_revokes_a_live_lease(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 2})
    token = server.token(job, "hoarder")
    worker = server.worker(token)
    lease = worker.post("/v1/work/lease").json()["lease_id"]
    assert [c["lease_id"] for c in copies(server, job) if c["state"] == CopyState.LEASED] == [lease]
    assert worker.post(f"/v1/jobs/{job}/leases/{lease}/revoke").status_code == 403  # admin only

    revoked = server.admin.post(f"/v1/jobs/{job}/leases/{lease}/revoke")
    assert revoked.status_code == 200 and revoked.json() == {"job_id": job, "tokens": 0, "leases": [lease]}
    beat = worker.post(f"/v1/work/leases/{lease}/heartbeat")
    assert beat.status_code == 410 and "revoked by the admin" in beat.json()["detail"]
    assert worker.put(f"/v1/work/leases/{lease}/delta", content=b"x").status_code == 410
    assert worker.get(f"/v1/work/leases/{lease}/copy").status_code == 410
    assert all(c["state"] == CopyState.PENDING and c["failures"] == 0 for c in copies(server, job))
    assert server.service.store.lease(lease).state is LeaseState.REVOKED

    again = server.admin.post(f"/v1/jobs/{job}/leases/{lease}/revoke")
    assert again.status_code == 409 and "only an active lease" in again.json()["detail"]
    assert server.admin.post(f"/v1/jobs/{job}/leases/lease-nope/revoke").status_code == 404
    other = server.create_job(tiny_model_dir, {"copies_m": 2}, task="t2")
    fresh = worker.post("/v1/work/lease").json()["lease_id"]
    assert server.admin.post(f"/v1/jobs/{other}/leases/{fresh}/revoke").status_code == 404  # another job's lease


def test_revoking_a_token_refuses_it_and_ends_its_leases(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 3})
    rogue = [server.worker(server.token(job, "rack/a")) for _ in range(2)]
    honest = server.worker(server.token(job, "rack/b"))
    held = [w.post("/v1/work/lease").json()["lease_id"] for w in rogue]
    assert honest.delete(f"/v1/jobs/{job}/tokens/rack/a").status_code == 403

    revoked = server.admin.delete(f"/v1/jobs/{job}/tokens/rack/a")
    assert revoked.status_code == 200 and revoked.json() == {"job_id": job, "tokens": 2, "leases": held}
    for worker in rogue:
        refused = worker.post("/v1/work/lease")
        assert refused.status_code == 401 and "unknown worker token" in refused.json()["detail"]
    assert sum(c["state"] == CopyState.PENDING for c in copies(server, job)) == 3
    assert honest.post("/v1/work/lease").json()["status"] == "leased"
    gone = server.admin.delete(f"/v1/jobs/{job}/tokens/rack/a")
    assert gone.status_code == 404 and "no live token labelled 'rack/a'" in gone.json()["detail"]
    assert server.admin.delete(f"/v1/jobs/job-nope/tokens/rack/b").status_code == 404


def test_pum_admin_revoke_lease_and_revoke_token(server, tiny_model_dir, monkeypatch, capsys):
    from pum.cli import main

    job = server.create_job(tiny_model_dir, {"copies_m": 2})
    worker = server.worker(server.token(job, "gpu0"))
    first, second = (worker.post("/v1/work/lease").json()["lease_id"] for _ in range(2))
    monkeypatch.setattr("pum.client.cli.http_client", lambda *args, **kwargs: server.admin)

    assert main(["admin", "revoke-lease", job, first]) == 0
    assert json.loads(capsys.readouterr().out) == {"job_id": job, "tokens": 0, "leases": [first]}
    assert main(["admin", "revoke-token", job, "gpu0"]) == 0
    assert json.loads(capsys.readouterr().out) == {"job_id": job, "tokens": 1, "leases": [second]}
    with pytest.raises(NotFound):
        AdminAPI(server.admin).revoke_token(job, "gpu0")
