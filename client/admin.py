"""The admin's side of the wire (AdminAPI); job files are read by `pum.client.job_file`."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import quote

import httpx
from pydantic import TypeAdapter

from pum.common.schemas import (
    JobCreate, JobStatus, JobSummary, ModelFiles, PrivacyReport, Revoked, TokenCreate, TokenIssued,
)
from pum.common.states import END_STATES, JobAction

from .api import parse, raise_for_status
from .progress import BarFactory, byte_bar

_JOB_LIST = TypeAdapter(list[JobSummary])


class AdminAPI:
    def __init__(self, http: httpx.Client):
        self.http = http

    def create_job(self, task: str, model_dir: str, pum: Mapping[str, Any], hyperparams: Mapping[str, Any]) -> JobStatus:
        body = JobCreate(task=task, model_dir=model_dir, pum=dict(pum), hyperparams=dict(hyperparams))
        return parse(self.http.post("/v1/jobs", json=body.model_dump()), JobStatus)

    def jobs(self) -> list[JobSummary]:
        return parse(self.http.get("/v1/jobs"), _JOB_LIST)

    def status(self, job_id: str) -> JobStatus:
        return parse(self.http.get(f"/v1/jobs/{job_id}"), JobStatus)

    def action(self, job_id: str, action: JobAction | str) -> JobStatus:
        """start, pause, resume, abort, advance or finalize."""
        return parse(self.http.post(f"/v1/jobs/{job_id}/{JobAction(action)}"), JobStatus)

    def delete_job(self, job_id: str) -> JobSummary:
        """Remove an ended job, its state and its exported model; what it was."""
        return parse(self.http.delete(f"/v1/jobs/{job_id}"), JobSummary)

    def issue_token(self, job_id: str, label: str = "worker") -> str:
        reply = parse(self.http.post(f"/v1/jobs/{job_id}/tokens", json=TokenCreate(label=label).model_dump()), TokenIssued)
        return reply.token

    def revoke_lease(self, job_id: str, lease_id: str) -> Revoked:
        return parse(self.http.post(f"/v1/jobs/{job_id}/leases/{quote(lease_id, safe='')}/revoke"), Revoked)

    def revoke_token(self, job_id: str, label: str) -> Revoked:
        """Revoke every token of the job with this label (ending their live leases)."""
        return parse(self.http.delete(f"/v1/jobs/{job_id}/tokens/{quote(label, safe='/')}"), Revoked)

    def privacy(self, job_id: str) -> PrivacyReport:
        return parse(self.http.get(f"/v1/jobs/{job_id}/privacy"), PrivacyReport)

    def download_model(self, job_id: str, dest: Path, bars: BarFactory | None = None) -> Path:
        """Each file of the finalized model into `dest`; `bars(name, size)` makes a progress bar per file."""
        bars = bars or partial(byte_bar, enabled=False)
        dest.mkdir(parents=True, exist_ok=True)
        for name in parse(self.http.get(f"/v1/jobs/{job_id}/model"), ModelFiles).files:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/model/{name}") as response:
                if not response.is_success:
                    response.read()
                    raise_for_status(response)
                size = response.headers.get("content-length")
                with (dest / name).open("wb") as f, bars(name, int(size) if size else None) as bar:
                    for chunk in response.iter_bytes(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        return dest

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5,
             sleep: Callable[[float], None] = time.sleep,
             on_status: Callable[[JobStatus], None] | None = None) -> JobStatus:
        """Poll until the job is finalized, aborted or failed; `on_status` sees every status polled.

        No timeout by default: a job runs as long as its rounds take. With `timeout_s`, raises
        TimeoutError past it.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if on_status:
                on_status(status)
            if status.state in END_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.state} (round {status.round}) after {timeout_s:g} s")
            sleep(poll_s)
