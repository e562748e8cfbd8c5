"""What the end-to-end tests share: start a job, wait for it and for its worker processes."""

from __future__ import annotations

import pytest

from pum.common.schemas import JobStatus
from pum.common.states import JobAction


def run_to_end(admin, job: str, workers: list, log_dir, timeout_s: float = 240) -> tuple[JobStatus, list[int], str]:
    """Start `job`, wait until it ends, then for the workers: (final status, worker exit codes, every *.log)."""
    admin.action(job, JobAction.START)
    try:
        status = admin.wait(job, timeout_s=timeout_s, poll_s=0.5)
    finally:
        exit_codes = [w.wait(timeout=60) for w in workers]
    return status, exit_codes, "\n".join(p.read_text() for p in log_dir.glob("*.log"))


@pytest.fixture
def job_runner():
    """run_to_end itself."""
    return run_to_end
