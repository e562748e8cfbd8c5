"""A PUM job in one process: the real server app (through an in-process httpx transport) and real
`Worker` objects, taking turns on the copies.

Same code path as `pum server` + `pum worker` (routes, publication, leases, uploads, merge, the
worker's carry folder), without three Python start-ups (3–7 s each on a busy CPU) and without
loopback sockets: what a benchmark of hundreds of jobs on a small machine needs. The processes
version is `pum.demo.cluster`.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pum.common.qa import QAPair
from pum.common.schemas import JobStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InProcessJob:
    model_dir: Path  # the merged model (Hugging Face folder), under work_dir/out
    status: JobStatus  # the admin's last view of the job
    seconds: float


def run_job_in_process(
    model_dir: Path, pum: dict, hyperparams: dict, forget: list[QAPair], retain: list[QAPair] | None,
    work_dir: Path, *, task: str = "inprocess", workers: int = 1, device: str | None = "cpu",
    idk_answers: Sequence[str] | None = None, timeout_s: float = 6 * 3600.0,
) -> InProcessJob:
    """Create, start and run a job on a fresh server state in `work_dir`; returns the merged model.

    `workers` Worker objects (one token each, a shared carry folder) take one copy each in turn
    until the job ends. Raises RuntimeError when the job ends other than finalized.
    """
    from fastapi.testclient import TestClient

    from pum.client.admin import AdminAPI
    from pum.client.api import WorkerAPI
    from pum.client.worker import Worker, WorkerOptions
    from pum.common.states import JobAction, JobState
    from pum.server.app import create_app
    from pum.server.config import ServerSettings

    work_dir = Path(work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    admin_token = secrets.token_urlsafe(24)
    settings = ServerSettings(state_dir=work_dir / "state", saves_dir=work_dir / "out", admin_token=admin_token,
                              lease_ttl_s=3600.0, dev_mode=True)  # dev: a seeded job (reproducible noise) is
    # accepted; this server answers no network, only the TestClients below
    started = time.perf_counter()
    app = create_app(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {admin_token}"}) as http:
        admin = AdminAPI(http)
        job = admin.create_job(task, str(Path(model_dir).resolve()), pum, hyperparams).id
        tokens = [admin.issue_token(job, f"worker-{i}") for i in range(workers)]
        admin.action(job, JobAction.START)
        options = WorkerOptions(saves_dir=work_dir / "worker", carry_dir=work_dir / "carry", device=device,
                                progress=False, max_copies=1, idk_answers=tuple(idk_answers) if idk_answers else None)
        turn, deadline = 0, time.monotonic() + timeout_s
        while (status := admin.status(job)).state is JobState.RUNNING:
            if time.monotonic() > deadline:
                admin.action(job, JobAction.ABORT)
                raise TimeoutError(f"job {job} not finished after {timeout_s:g} s")
            client = TestClient(app, headers={"Authorization": f"Bearer {tokens[turn % workers]}"})
            Worker(WorkerAPI(client), forget, retain, options, sleep=time.sleep).run()
            turn += 1
        if status.state is not JobState.FINALIZED:
            raise RuntimeError(f"job {job} ended {status.state}: {status.error}")
    log.info("in-process job %s finalized in %.0f s (%d turns)", job, time.perf_counter() - started, turn)
    return InProcessJob(Path(status.output_dir), status, time.perf_counter() - started)
