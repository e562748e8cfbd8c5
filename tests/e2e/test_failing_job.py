"""A real worker that cannot train a copy (a GradDiff job, a worker without a retain set) gives it
back with its reason; at max_copy_failures the job is failed with that reason, and `pum admin wait`
returns at once with it and exit status 4."""

from __future__ import annotations

import os
import subprocess

import pytest

from pum.client.admin import AdminAPI
from pum.client.cli import http_client
from pum.common.states import JobAction, JobState
from pum.demo.cluster import PUM, LocalServer, start_worker

pytestmark = pytest.mark.e2e


def test_a_copy_that_fails_on_a_real_worker_fails_the_job_and_wait_exits_4(tmp_path, demo_assets):
    assets = demo_assets[1]
    with LocalServer(tmp_path / "state", tmp_path / "saves", log_path=tmp_path / "server.log") as server, \
            http_client(server.url, server.admin_token) as http:
        admin = AdminAPI(http)
        pum = {"copies_m": 2, "rounds_R": 1, "inner_handler": "GradDiff", "max_copy_failures": 1, "local_max_steps": 1}
        job = admin.create_job("fails", str(assets.model_dir), pum, {"lr": 1e-5, "batch_size": 4}).id
        admin.action(job, JobAction.START)
        worker = start_worker(server.url, admin.issue_token(job), assets.split("forget10"), None, tmp_path / "ws",
                              log_path=tmp_path / "worker.log")  # no --retain: GradDiff's retain term cannot run
        env = {**os.environ, "PUM_ADMIN_TOKEN": server.admin_token}
        waited = subprocess.run([*PUM, "admin", "--server", server.url, "wait", job, "--no-progress"],
                                capture_output=True, text=True, timeout=180, env=env)
        worker.wait(timeout=60)
        status = admin.status(job)
    log = (tmp_path / "worker.log").read_text()[-2000:]
    assert status.state is JobState.FAILED, log
    assert status.failure is not None and status.failure.failures == 1 and len(status.failure.reasons) == 1
    assert "retain" in status.failure.reasons[0].lower(), status.failure.reasons
    assert waited.returncode == 4, waited.stderr
    assert f"job {job} failed" in waited.stderr and status.failure.reasons[0][:40] in waited.stderr
