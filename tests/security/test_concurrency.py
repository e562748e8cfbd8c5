"""64 workers against one real server on 127.0.0.1: leases never overlap, every copy merges once.

Each simulated worker is a thread with its own `httpx.Client` and worker token. It leases,
downloads its copy, heartbeats and uploads a delta that depends only on the copy's bytes, so the
final model can be recomputed here. Some workers let their first lease run out (their heartbeat
and upload must get 410), some upload every accepted delta a second time (409). A monitor reads
the server's SQLite file read-only throughout and looks for a copy held by two live leases.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
import pytest
import torch
from safetensors.torch import load, load_file, save

from pum.client.cli import http_client
from pum.common.noise import draw_alphas, job_key_from_seed
from pum.demo.cluster import LocalServer

WORKERS, M, ROUNDS, TTL_S, ETA, SEED = 64, 16, 2, 3.0, 0.8, 11
DEADLINE_S = 45.0
MAX_LOOPS = 400  # per worker
STAMP_SLACK_S = 1.0  # < TTL_S: an overlap of a lease kept alive by heartbeats is longer


def delta_of(copy: bytes) -> dict[str, torch.Tensor]:
    """A reproducible update that depends only on the copy's content."""
    return {name: (1e-3 * torch.tanh(t.float()) + 1e-4).contiguous() for name, t in load(copy).items()}


@dataclass
class WorkerLog:
    """What one simulated worker saw: (monotonic time, what, lease id, HTTP status)."""

    role: str
    events: list[tuple[float, str, str, int]] = field(default_factory=list)
    copies: dict[str, bytes] = field(default_factory=dict)
    error: BaseException | None = None

    def add(self, what: str, lease_id: str, status: int) -> None:
        self.events.append((time.monotonic(), what, lease_id, status))


def run_worker(url: str, token: str, role: str, log: WorkerLog, stop_at: float) -> None:
    rng = random.Random(token)
    lazy_left = 1 if role == "lazy" else 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0) as http:
        for _ in range(MAX_LOOPS):
            if time.monotonic() > stop_at:
                return
            reply = http.post("/v1/work/lease")
            log.add("lease", reply.json().get("lease_id", ""), reply.status_code)
            body = reply.json()
            if body["status"] == "done":
                return
            if body["status"] == "wait":
                time.sleep(rng.uniform(0.05, min(0.3, body["retry_after_s"])))
                continue
            lease_id = body["lease_id"]
            copy = http.get(f"/v1/work/leases/{lease_id}/copy")
            log.add("copy", lease_id, copy.status_code)
            if copy.status_code != 200:
                continue
            log.copies[lease_id] = copy.content
            if lazy_left:
                lazy_left -= 1
                time.sleep(TTL_S + 1.5)  # no heartbeat: the lease runs out
            beat = http.post(f"/v1/work/leases/{lease_id}/heartbeat")
            log.add("heartbeat", lease_id, beat.status_code)
            upload = http.put(f"/v1/work/leases/{lease_id}/delta", content=save(delta_of(copy.content)))
            log.add("upload", lease_id, upload.status_code)
            if upload.status_code == 200 and role == "double":
                again = http.put(f"/v1/work/leases/{lease_id}/delta", content=save(delta_of(copy.content)))
                log.add("upload again", lease_id, again.status_code)


class Monitor(threading.Thread):
    """Reads state.db read-only every few ms: a copy with two live leases, a leased copy whose
    lease is not live, or a copy accepted twice is recorded as a violation."""

    QUERIES = {
        "two live leases on one copy": "SELECT round, k, COUNT(*) FROM leases WHERE job_id = :job AND state = 'active' "
                                       "GROUP BY round, k HAVING COUNT(*) > 1",
        "leased copy without its live lease": "SELECT c.round, c.k, c.lease_id FROM copies c LEFT JOIN leases l "
                                              "ON l.id = c.lease_id WHERE c.job_id = :job AND c.state = 'leased' "
                                              "AND (l.state IS NULL OR l.state != 'active' OR l.k != c.k)",
        "copy accepted by two leases": "SELECT round, k, COUNT(*) FROM leases WHERE job_id = :job AND state = 'done' "
                                       "GROUP BY round, k HAVING COUNT(*) > 1",
    }

    def __init__(self, connect, job_id: str):
        super().__init__(daemon=True, name="lease-monitor")
        self.connect, self.job_id = connect, job_id
        self.stop = threading.Event()
        self.snapshots = 0
        self.max_live = 0
        self.violations: list[tuple[str, list[tuple]]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        db = self.connect()
        try:
            while not self.stop.wait(0.01):
                db.execute("BEGIN")  # one snapshot for all queries
                try:
                    for what, sql in self.QUERIES.items():
                        rows = [tuple(r) for r in db.execute(sql, {"job": self.job_id})]
                        if rows:
                            self.violations.append((what, rows))
                    live = db.execute("SELECT COUNT(*) FROM leases WHERE job_id = ? AND state = 'active'",
                                      (self.job_id,)).fetchone()[0]
                    self.max_live = max(self.max_live, live)
                finally:
                    db.execute("COMMIT")
                self.snapshots += 1
        except BaseException as err:  # reported by the test
            self.error = err
        finally:
            db.close()


@pytest.mark.e2e
def test_64_workers_lease_heartbeat_upload_concurrently(tmp_path, tiny_model_dir, state_db):
    server = LocalServer(tmp_path / "state", tmp_path / "saves", lease_ttl_s=TTL_S, log_path=tmp_path / "server.log",
                         dev=True)  # a seeded job
    with server, http_client(server.url, server.admin_token, timeout=60) as admin:
        body = {"task": "concurrency", "model_dir": str(tiny_model_dir), "hyperparams": {},
                "pum": {"copies_m": M, "rounds_R": ROUNDS, "eta_srv": ETA, "seed": SEED, "noise_kappa": 0.02}}
        job = admin.post("/v1/jobs", json=body).raise_for_status().json()["id"]
        tokens = [admin.post(f"/v1/jobs/{job}/tokens", json={"label": f"w{i}"}).raise_for_status().json()["token"]
                  for i in range(WORKERS)]
        roles = ["lazy" if i % 8 == 3 else "double" if i % 2 else "plain" for i in range(WORKERS)]  # 8, 24, 32
        logs = [WorkerLog(role) for role in roles]
        monitor = Monitor(lambda: state_db.connect(server.state_dir), job)
        monitor.start()
        admin.post(f"/v1/jobs/{job}/start").raise_for_status()
        stop_at = time.monotonic() + DEADLINE_S

        def guarded(i: int) -> None:
            try:
                run_worker(server.url, tokens[i], roles[i], logs[i], stop_at)
            except BaseException as err:
                logs[i].error = err

        threads = [threading.Thread(target=guarded, args=(i,), name=f"worker-{i}") for i in range(WORKERS)]
        for thread in sorted(threads, key=lambda t: roles[int(t.name.split("-")[1])] == "plain"):
            thread.start()  # the lazy and double workers first, so that each of them gets a copy
        for thread in threads:
            thread.join(timeout=max(1.0, stop_at + 35 - time.monotonic()))
        monitor.stop.set()
        monitor.join(timeout=10)
        status = admin.get(f"/v1/jobs/{job}").raise_for_status().json()
        server_log = (tmp_path / "server.log").read_text(errors="replace")

    # prepare: what happened, client side and server side
    assert not [t.name for t in threads if t.is_alive()], "workers still running after the deadline"
    errors = {i: repr(log.error) for i, log in enumerate(logs) if log.error}
    assert not errors, errors
    assert monitor.error is None, repr(monitor.error)
    db = state_db.connect(server.state_dir)
    leases = [dict(r) for r in db.execute("SELECT * FROM leases WHERE job_id = ? ORDER BY created_at", (job,))]
    db.close()
    events = [(e, log.role) for log in logs for e in log.events]
    statuses = defaultdict(set)
    for (_, what, _, code), _ in events:
        statuses[what].add(code)

    # no server errors, and only the answers the protocol allows
    assert all(code < 500 for codes in statuses.values() for code in codes), (dict(statuses), server_log[-3000:])
    assert statuses["lease"] == {200}
    assert statuses["upload"] <= {200, 410} and statuses["upload again"] == {409}
    assert statuses["heartbeat"] <= {200, 410} and statuses["copy"] <= {200, 410}

    # the job completed: every copy of every round merged exactly once
    assert status["state"] == "finalized", (status["state"], status["error"], server_log[-3000:])
    assert [r["accepted"] for r in status["rounds"]] == [M] * ROUNDS
    assert all(c["state"] == "accepted" for r in status["rounds"] for c in r["copies"])

    # no copy was ever held by two live leases: live snapshots, and the lease history afterwards
    assert monitor.snapshots > 50 and monitor.max_live > 1, (monitor.snapshots, monitor.max_live)
    assert not monitor.violations, monitor.violations[:5]
    by_copy = defaultdict(list)
    for lease in leases:
        by_copy[(lease["round"], lease["k"])].append(lease)
    assert sorted(by_copy) == [(r, k) for r in range(1, ROUNDS + 1) for k in range(M)]
    for copy, history in by_copy.items():
        assert [l["state"] for l in history].count("done") == 1 and history[-1]["state"] == "done", (copy, history)
        for before, after in zip(history, history[1:]):
            assert before["state"] == "expired", (copy, before)
            # created_at is the clock the lease request read before it queued for the store, so
            # under load it can be a little older than the grant itself: STAMP_SLACK_S allows that
            assert after["created_at"] > before["expires_at"] - STAMP_SLACK_S, (
                f"copy {copy}: {after['id']} granted {before['expires_at'] - after['created_at']:.3f} s "
                f"before {before['id']} ran out")

    # lazy workers got 410 on heartbeat and upload; second uploads got 409
    upload_of = {(lid, what): code for (_, what, lid, code), _ in events if what in ("upload", "heartbeat")}
    lazy_leases = [next(e[2] for e in log.events if e[1] == "copy" and e[3] == 200)
                   for log in logs if log.role == "lazy" and any(e[1] == "copy" for e in log.events)]
    assert len(lazy_leases) >= 2, "too few lazy workers got a lease to test expiry"
    for lease_id in lazy_leases:
        assert upload_of[(lease_id, "heartbeat")] == 410 and upload_of[(lease_id, "upload")] == 410, lease_id
    doubles = [e for e, role in events if e[1] == "upload again"]
    assert len(doubles) >= 4 and {e[3] for e in doubles} == {409}
    state_of = {l["id"]: l["state"] for l in leases}
    accepted = {lid for (_, what, lid, code), _ in events if what == "upload" and code == 200}
    refused = {lid for (_, what, lid, code), _ in events if what == "upload" and code == 410}
    assert accepted == {lid for lid, state in state_of.items() if state == "done"}
    assert all(state_of[lid] == "expired" for lid in refused)

    # the merged model is θ + η·(harmonic mean of the deltas), round after round
    copies = {lid: data for log in logs for lid, data in log.copies.items()}
    k_of = {l["id"]: (l["round"], l["k"]) for l in leases}
    published = defaultdict(set)
    for lid, data in copies.items():
        published[k_of[lid]].add(data)
    assert all(len(versions) == 1 for versions in published.values()), "a copy was published with different bytes"
    key = job_key_from_seed(SEED)
    theta = {n: t.double() for n, t in load_file(tiny_model_dir / "model.safetensors").items()}
    settings = status["settings"]
    for r in range(1, ROUNDS + 1):
        alphas = draw_alphas(key, r, M, settings["alpha_min"], settings["alpha_max"])
        s0 = sum(1 / a for a in alphas)
        deltas = {k: delta_of(next(iter(published[(r, k)]))) for k in range(M)}
        theta = {n: t + ETA * sum(deltas[k][n].double() / alphas[k] for k in range(M)) / s0 for n, t in theta.items()}
    merged = load_file(f"{status['output_dir']}/model.safetensors")
    for name, expected in theta.items():
        torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=2e-6, msg=name)


# ---- check-then-act races, made deterministic in-process ----------------------------------------
def _tiny_delta(server, job: str) -> bytes:
    layout = server.service.uploads.layout(job, 1)
    return save({i.name: torch.full(tuple(i.shape), 1e-3) for i in layout})


def test_lease_expiring_during_its_merge_is_410_not_500(server, tiny_model_dir, monkeypatch):
    from fastapi.testclient import TestClient

    import pum.server.uploads as uploads

    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1})
    first, second = server.token(job, "slow"), server.token(job, "next")
    slow = TestClient(server.admin.app, headers={"Authorization": f"Bearer {first}"}, raise_server_exceptions=False)
    lease_id = slow.post("/v1/work/lease").json()["lease_id"]
    # the other copy is merged first, so the slow one's is the only copy left to re-grant (leases are random)
    helper = server.worker(server.token(job, "helper"))
    other = helper.post("/v1/work/lease").json()["lease_id"]
    assert helper.put(f"/v1/work/leases/{other}/delta", content=_tiny_delta(server, job)).status_code == 200
    before = server.service.store.round(job, 1)
    regranted = {}
    weigh = uploads.copy_noise

    def slow_merge(*args, **kwargs):
        out = weigh(*args, **kwargs)
        server.clock.now += server.settings.lease_ttl_s + 1  # a long merge, heartbeats lost meanwhile
        regranted.update(server.service.work.lease(second).model_dump())  # another worker asks for work right then
        return out

    monkeypatch.setattr(uploads, "copy_noise", slow_merge)
    response = slow.put(f"/v1/work/leases/{lease_id}/delta", content=_tiny_delta(server, job))
    assert regranted.get("status") == "leased"
    assert server.service.store.lease(regranted["lease_id"]).k == server.service.store.lease(lease_id).k
    assert response.status_code == 410, (response.status_code, response.text)
    rnd = server.service.store.round(job, 1)
    assert (rnd.accepted, rnd.s1_file) == (1, before.s1_file)  # the helper's copy only


def test_heartbeat_racing_expiry_does_not_report_success(server, tiny_model_dir, monkeypatch):
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1})
    first, second = server.token(job, "beating"), server.token(job, "next")
    worker = server.worker(first)
    lease_id = worker.post("/v1/work/lease").json()["lease_id"]
    store = server.service.store
    extend = store.extend_lease

    def late_extend(lease, ttl_s):
        server.clock.now += server.settings.lease_ttl_s + 1
        server.service.work.lease(second)  # expires the lease and hands its copy on
        return extend(lease, ttl_s)

    monkeypatch.setattr(store, "extend_lease", late_extend)
    response = worker.post(f"/v1/work/leases/{lease_id}/heartbeat")
    assert store.lease(lease_id).state == "expired"
    assert response.status_code == 410, (response.status_code, response.text)
