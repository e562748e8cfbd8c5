"""`pum admin status` and `watch`: a short table a person reads, from the typed status of a real job."""

from __future__ import annotations

import io
import re

from safetensors.torch import load, save

from pum.client.admin import AdminAPI
from pum.client.status_view import duration, status_table, watch
from pum.common.errors import PumError

M, R = 4, 2


def delta(copy: bytes) -> bytes:
    return save({n: (0.01 * t.float()).contiguous() for n, t in load(copy).items()})


def half_done_job(server, model_dir) -> str:
    """Round 1 of m = 4, R = 2: two copies accepted (gpu-a, gpu-b), one given back, one expired, two held."""
    job = server.create_job(model_dir, {"copies_m": M, "rounds_R": R, "noise_kappa": 0.01})
    a, b = server.worker(server.token(job, "gpu-a")), server.worker(server.token(job, "gpu-b"))

    def lease(worker) -> str:
        return worker.post("/v1/work/lease").json()["lease_id"]

    for worker in (a, b):
        lease_id = lease(worker)
        worker.put(f"/v1/work/leases/{lease_id}/delta", content=delta(worker.get(f"/v1/work/leases/{lease_id}/copy").content))
    a.post(f"/v1/work/leases/{lease(a)}/release", json={"reason": "out of memory"})
    lease(b)
    server.clock.now += server.settings.lease_ttl_s + 1
    lease(a), lease(b)  # the expired lease is swept first
    server.clock.now += 30
    return job


def read(api: AdminAPI, job: str):
    def reader():
        try:
            report = api.privacy(job)
        except PumError:
            report = None
        return api.status(job), report
    return reader


def test_status_of_a_running_job_fits_in_30_lines_and_says_what_matters(server, tiny_model_dir):
    job = half_done_job(server, tiny_model_dir)
    api = AdminAPI(server.admin)
    status = api.status(job)
    text = status_table(*read(api, job)())
    lines = text.splitlines()
    assert len(lines) <= 30, text
    assert lines[0] == f"job {job} (task t1): running, round 1/2"
    assert "copies 2/8 accepted" in lines[1] and "ETA" in lines[1] and "copies/h" in lines[1], lines[1]
    assert lines[2].startswith("privacy: "), lines[2]
    assert "round 1  open  2/4 accepted" in text
    rows = {int(r.split()[0]): r.split() for r in lines if re.match(r"^  \d ", r)}
    assert len(rows) == M
    workers = {c.k: c.worker for c in status.rounds[0].copies}
    assert sorted(w for w in workers.values()) == ["gpu-a", "gpu-a", "gpu-b", "gpu-b"]
    for k, row in rows.items():
        assert row[2] == workers[k]
    assert "expired 1" in text and "failed 1" in text  # how the two lost leases ended
    assert not re.search(r"\b1\d{9}\b", text), "Unix timestamps: the table shows durations"
    held = [c.seconds for c in status.rounds[0].copies if c.state == "leased"]
    assert held == [30.0, 30.0], held  # leased by the clock 30 s ago
    assert "30s" in text


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (None, 0.42, 12, 187, 7500, 3 * 86400 + 4 * 3600)] == [
        "-", "0.4s", "12s", "3m 07s", "2h 05m", "3d 04h"]


def test_watch_refreshes_a_bounded_number_of_times(server, tiny_model_dir):
    job = half_done_job(server, tiny_model_dir)
    out, naps = io.StringIO(), []
    status = watch(read(AdminAPI(server.admin), job), out, interval_s=0.25, count=3, clear=False, sleep=naps.append)
    assert status.state == "running"
    assert out.getvalue().count(f"job {job} ") == 3 and naps == [0.25, 0.25]


def test_watch_stops_when_the_job_ends(server, tiny_model_dir):
    job = half_done_job(server, tiny_model_dir)
    server.admin.post(f"/v1/jobs/{job}/abort")
    out = io.StringIO()
    status = watch(read(AdminAPI(server.admin), job), out, count=None, clear=True, sleep=lambda s: None)
    assert status.state == "aborted" and out.getvalue().count("\x1b[H\x1b[2J") == 1
    assert "ETA" not in out.getvalue()
