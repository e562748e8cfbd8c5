"""Watching a real job as an operator: /metrics, `pum admin status` and `watch`, JSON logs.

`pum server` and two `pum worker` processes (w0, w1) run the demo job with m = 4, R = 2 and
auto_advance off, so the job waits, running, after round 1: there the test scrapes /metrics and
runs `pum admin status` and `watch`; then it advances the job to its end and scrapes again. Both
the server and the workers log with `--log-format json`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pum.client.admin import AdminAPI
from pum.client.cli import http_client
from pum.common.states import JobState
from pum.demo.cluster import LocalServer, start_worker

pytestmark = pytest.mark.e2e
M, R = 4, 2


def scrape(url: str, token: str) -> dict[tuple, float]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    return {(s.name, *sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def sample(samples, name: str, **labels) -> float:
    return samples[(name, *sorted(labels.items()))]


def pum_admin(server: LocalServer, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pum.cli", "admin", "--server", server.url, "--token",
                           server.admin_token, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def wait_until(check, timeout_s: float = 300.0, what: str = "the job"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not get there in {timeout_s:g} s")


def test_an_operator_watches_a_real_job(tmp_path, demo_assets):
    assets = demo_assets[1]
    saves = tmp_path / "saves"
    server = LocalServer(state_dir=tmp_path / "state", saves_dir=saves, log_path=tmp_path / "server.log",
                         extra_env={"PUM_LOG_FORMAT": "json"})
    with server, http_client(server.url, server.admin_token) as http:
        admin = AdminAPI(http)
        pum = {"copies_m": M, "rounds_R": R, "noise_kappa": 0.01, "inner_handler": "GradDiff", "local_max_steps": 2,
               "auto_advance": False}
        job = admin.create_job("operate", str(assets.model_dir), pum, {"lr": 1e-3, "batch_size": 8}).id
        workers = [start_worker(server.url, admin.issue_token(job, f"w{i}"), assets.split("forget10"),
                                assets.split("retain90"), saves, log_path=tmp_path / f"worker{i}.log",
                                extra_args=("--log-format", "json")) for i in range(2)]
        try:
            admin.action(job, "start")
            status = wait_until(lambda: (s := admin.status(job)).rounds[0].accepted == M and s, what="round 1")
            assert status.state is JobState.RUNNING and status.round == 1  # waiting for the admin to advance

            # /metrics while the job runs
            during = scrape(server.url, server.admin_token)
            copy_bytes = status.progress.copy_bytes
            assert copy_bytes and copy_bytes > 10_000
            assert sample(during, "pum_jobs", state="running") == 1
            assert sample(during, "pum_job_round", job=job) == 1 and sample(during, "pum_job_rounds", job=job) == R
            assert sample(during, "pum_copies", job=job, state="accepted") == M
            assert sample(during, "pum_copies_accepted_total", job=job) == M
            assert sample(during, "pum_leases", job=job, state="done") == M
            assert sample(during, "pum_leases_granted_total", job=job) == M
            assert sample(during, "pum_served_bytes_total", what="copy") == M * copy_bytes  # each copy once, whole
            received = sample(during, "pum_received_bytes_total")
            assert received % M == 0 and received >= M * copy_bytes * 0.9  # float32 deltas of the same tensors
            for name in ("copy_generation", "upload", "merge"):
                assert sample(during, f"pum_{name}_seconds_count") == M
                assert sample(during, f"pum_{name}_seconds_sum") > 0
            assert sample(during, "pum_step_seconds_count") == 0

            # the table a person reads, on the running job
            table = pum_admin(server, "status", job)
            lines = table.splitlines()
            assert len(lines) <= 30, table
            assert lines[0] == f"job {job} (task operate): running, round 1/2", table
            assert f"copies {M}/{M * R} accepted" in table and "ETA" in table
            rows = [line.split() for line in lines if line.startswith("  ") and line.split()[0].isdigit()]
            assert len(rows) == M and {row[2] for row in rows} <= {"w0", "w1"} and all(r[1] == "accepted" for r in rows)
            document = json.loads(pum_admin(server, "status", job, "--json"))
            assert document["id"] == job and len(document["rounds"][0]["copies"]) == M
            watched = pum_admin(server, "watch", job, "--count", "2", "--interval", "0.2")
            assert watched.count(f"job {job} ") == 2 and "\x1b[2J" not in watched  # not a terminal: no clearing

            admin.action(job, "advance")
            wait_until(lambda: (s := admin.status(job)).round == 2 and s.rounds[1].accepted == M, what="round 2")
            admin.action(job, "advance")  # auto_advance is off for every round: the last step too
            final = admin.wait(job, timeout_s=120)
            assert final.state is JobState.FINALIZED
        finally:
            codes = [w.wait(timeout=120) for w in workers]
        assert codes == [0, 0]

        after = scrape(server.url, server.admin_token)
        assert sample(after, "pum_jobs", state="finalized") == 1
        assert sample(after, "pum_copies_accepted_total", job=job) == M * R
        assert sample(after, "pum_job_rounds_merged", job=job) == R
        assert sample(after, "pum_step_seconds_count") == R
        assert sample(after, "pum_served_bytes_total", what="copy") == M * R * copy_bytes
        assert sample(after, "pum_received_bytes_total") == 2 * received

    server_events = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.strip()]
    served = [e for e in server_events if e["message"].startswith(f"job {job}") and "served lease-" in e["message"]]
    assert len(served) == M * R and {e["worker"] for e in served} <= {"w0", "w1"}
    assert all(e["bytes"] == copy_bytes and e["seconds"] >= 0 and e["job"] == job for e in served)
    steps = [e for e in server_events if "step applied" in e["message"]]
    assert [e["round"] for e in steps] == [1, 2]
    # every line a worker wrote is JSON: its log events, and the summary it prints on stdout at the end
    worker_events = [json.loads(line) for i in range(2) for line in (tmp_path / f"worker{i}.log").read_text().splitlines()]
    done = [e for e in worker_events if "copy done" in e.get("message", "")]  # stdout ends with a JSON summary
    assert len(done) == M * R and all(e["job"] == job and e["bytes"] > 0 and e["seconds"] > 0 for e in done)
