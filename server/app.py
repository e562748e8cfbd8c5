"""The HTTP edge: decode, call one JobService method, encode. No round logic here."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from pum.common.errors import InvalidInput, PumError

from .auth import AdminOnly, Service, WorkerToken
from .config import ServerSettings
from .service import JobService
from .store import Store

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    detail: str = Field(description="what is wrong and what to change")


ERRORS = {
    400: "invalid input", 401: "missing or unknown token", 403: "a token without the right role",
    404: "no such job, lease or file", 408: "the upload stalled", 409: "the state does not allow it",
    410: "the lease expired or ended", 413: "the upload is larger than the model's delta",
    416: "a Range outside the copy",
}


class JobCreate(BaseModel):
    task: str = Field(description="task name; the merged model goes to saves/unlearn/<task>/")
    model_dir: str = Field(description="Hugging Face model folder on the server (safetensors)")
    pum: dict[str, Any] = Field(default_factory=dict, description="PUM settings (DESIGN.md §8 names)")
    hyperparams: dict[str, Any] = Field(default_factory=dict, description="inner method hyperparameters for the workers")


class TokenCreate(BaseModel):
    label: str = Field("worker", max_length=100, description="a name for the worker, shown in logs")
    party: str = Field("", max_length=100, description="the data owner the token belongs to; tokens of one party "
                       "are one adversary in the privacy report (default: every token is the job's one data owner)")


class Release(BaseModel):
    reason: str = Field("", max_length=2000, description="why the worker gives the copy back")


def range_start(header: str | None) -> int:
    """The N of `Range: bytes=N-`; the only form a resuming worker needs."""
    if header is None:
        return 0
    match = re.fullmatch(r"bytes=(\d+)-", header.strip())
    if not match:
        raise InvalidInput(f"unsupported Range {header[:60]!r}: send 'bytes=N-' to resume from byte N")
    return int(match.group(1))


def job_summary(job) -> dict:
    return {"id": job.id, "task": job.task, "state": job.state, "round": job.round, "created_at": job.created_at}


def create_app(settings: ServerSettings, service: JobService | None = None) -> FastAPI:
    """The FastAPI application over a state folder (or a given service, for tests)."""
    app = FastAPI(
        title="PUM server", version="0.1.0", description="Perturb–Unlearn–Merge federated unlearning",
        responses={code: {"model": ErrorBody, "description": text} for code, text in ERRORS.items()},
    )
    app.state.service = service or JobService(Store(settings.state_dir / "state.db"), settings)

    @app.exception_handler(PumError)
    async def pum_error(request: Request, err: PumError) -> JSONResponse:
        return JSONResponse(status_code=err.status, content={"detail": str(err)})

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness: the server answers."""
        return {"status": "ok"}

    # ---- admin -------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201, dependencies=[AdminOnly])
    def create_job(body: JobCreate, service: Service) -> dict:
        """Create a job from a model folder, PUM settings and the inner method's hyperparameters."""
        job = service.create_job(body.task, body.model_dir, body.pum, body.hyperparams)
        return service.status(job.id)

    @app.get("/v1/jobs", dependencies=[AdminOnly])
    def list_jobs(service: Service) -> list[dict]:
        """All jobs, oldest first."""
        return [job_summary(job) for job in service.jobs()]

    @app.get("/v1/jobs/{job_id}", dependencies=[AdminOnly])
    def job_status(job_id: str, service: Service) -> dict:
        """State, round, and each copy's state and timings."""
        return service.status(job_id)

    def add_action(action: str, doc: str) -> None:
        def handler(job_id: str, service: Service) -> dict:
            getattr(service, action)(job_id)
            return service.status(job_id)

        handler.__doc__ = doc
        app.add_api_route(f"/v1/jobs/{{job_id}}/{action}", handler, methods=["POST"], dependencies=[AdminOnly], name=action)

    for action, doc in {
        "start": "Open round 1 and hand out copies.",
        "pause": "Stop handing out leases; uploads on live leases are still taken.",
        "resume": "Hand out leases again.",
        "abort": "End the job without saving a model.",
        "advance": "Step a complete round (jobs with auto_advance off).",
        "finalize": "Save the model of the last completed round and end the job.",
    }.items():
        add_action(action, doc)

    @app.post("/v1/jobs/{job_id}/tokens", status_code=201, dependencies=[AdminOnly])
    def issue_token(job_id: str, body: TokenCreate, service: Service) -> dict:
        """A new worker token for the job; it is shown only in this response."""
        token = service.issue_token(job_id, body.label, body.party)
        return {"token": token, "label": body.label, "party": body.party, "job_id": job_id}

    @app.get("/v1/jobs/{job_id}/privacy", dependencies=[AdminOnly])
    def privacy(job_id: str, service: Service) -> dict:
        """The privacy report over all R rounds: headline true ε against the largest party, the seed formula's ε, σ_ℓ, τ_ℓ, reasons, warnings."""
        return service.privacy(job_id)

    @app.get("/v1/jobs/{job_id}/model", dependencies=[AdminOnly])
    def model_files(job_id: str, service: Service) -> dict:
        """Files of the finalized model."""
        return {"files": service.output_files(job_id)}

    @app.get("/v1/jobs/{job_id}/model/{name}", dependencies=[AdminOnly])
    def model_file(job_id: str, name: str, service: Service) -> FileResponse:
        """One file of the finalized model."""
        return FileResponse(service.output_file(job_id, name), filename=name)

    # ---- workers -----------------------------------------------------------------------
    @app.post("/v1/work/lease")
    def lease(token: WorkerToken, service: Service) -> dict:
        """Lease a copy of the current round: 'leased', 'wait' (retry later) or 'done'."""
        return service.lease(token)

    @app.post("/v1/work/leases/{lease_id}/heartbeat")
    def heartbeat(lease_id: str, token: WorkerToken, service: Service) -> dict:
        """Extend a live lease by the lease TTL."""
        return service.heartbeat(token, lease_id)

    @app.post("/v1/work/leases/{lease_id}/release")
    def release(lease_id: str, body: Release, token: WorkerToken, service: Service) -> dict:
        """Give a copy back (the worker failed or stops); it is offered to another worker."""
        service.release(token, lease_id, body.reason)
        return {"released": True}

    @app.get("/v1/work/files/{name}")
    def public_file(name: str, token: WorkerToken, service: Service) -> FileResponse:
        """A public file of the job's model (config, tokenizer)."""
        return FileResponse(service.public_file(token, name), filename=name)

    @app.get("/v1/work/leases/{lease_id}/copy", response_class=StreamingResponse)
    def download_copy(
        lease_id: str, token: WorkerToken, service: Service, range: Annotated[str | None, Header()] = None
    ) -> StreamingResponse:
        """The lease's perturbed copy as a safetensors stream, generated tensor by tensor.

        `Range: bytes=N-` resumes a cut download: the bytes are regenerated from the seeds."""
        start = range_start(range)
        size, chunks = service.copy_download(token, lease_id, start)
        headers = {"Content-Length": str(size - start), "Accept-Ranges": "bytes"}
        if range is None:
            return StreamingResponse(chunks, media_type="application/octet-stream", headers=headers)
        headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        return StreamingResponse(chunks, status_code=206, media_type="application/octet-stream", headers=headers)

    @app.put(
        "/v1/work/leases/{lease_id}/delta",
        openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def upload_delta(lease_id: str, request: Request, token: WorkerToken, service: Service) -> dict:
        """Upload the float32 delta (trained − received) of every tensor, as safetensors."""
        declared = request.headers.get("content-length")
        lease, spool = await service.receive_delta(
            token, lease_id, request.stream(), int(declared) if declared and declared.isdigit() else None
        )
        return await run_in_threadpool(service.merge_delta, lease, spool)

    return app
