"""Worker routes: leases, heartbeats, give-backs, public files, the copy, the delta upload."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from pum.common.errors import InvalidInput
from pum.common.schemas import Heartbeat, LeaseReply, Release, Released, UploadAccepted, UploadKind

from .auth import Service, WorkerToken
from .binary import BINARY, binary_reply, binary_response

router = APIRouter(prefix="/v1/work", tags=["workers"])


def range_start(header: str | None) -> int:
    """The N of `Range: bytes=N-`; the only form a resuming worker needs."""
    if header is None:
        return 0
    match = re.fullmatch(r"bytes=(\d+)-", header.strip())
    if not match:
        raise InvalidInput(f"unsupported Range {header[:60]!r}: send 'bytes=N-' to resume from byte N")
    return int(match.group(1))


@router.post("/lease", response_model=LeaseReply)
def lease(token: WorkerToken, service: Service) -> LeaseReply:
    """Lease a copy of the current round: 'leased', 'wait' (retry later) or 'done'."""
    return service.work.lease(token)


@router.post("/leases/{lease_id}/heartbeat", response_model=Heartbeat)
def heartbeat(lease_id: str, token: WorkerToken, service: Service) -> Heartbeat:
    """Extend a live lease by the lease TTL."""
    return service.work.heartbeat(token, lease_id)


@router.post("/leases/{lease_id}/release", response_model=Released)
def release(lease_id: str, body: Release, token: WorkerToken, service: Service) -> Released:
    """Give a copy back (the worker failed or stops); it is offered to another worker."""
    return service.work.release(token, lease_id, body.reason)


@router.get("/files/{name}", response_class=StreamingResponse, responses=binary_reply("the file's bytes"))
def public_file(name: str, token: WorkerToken, service: Service) -> StreamingResponse:
    """A public file of the job's model (config, tokenizer)."""
    return binary_response(*service.work.public_file(token, name))


@router.get("/leases/{lease_id}/copy", response_class=StreamingResponse,
            responses=binary_reply("the copy as safetensors (206: from the Range start on)", 200, 206))
def download_copy(
    lease_id: str, token: WorkerToken, service: Service, range: Annotated[str | None, Header()] = None
) -> StreamingResponse:
    """The lease's perturbed copy as a safetensors stream, generated tensor by tensor; one download
    per lease at a time (409 while one is open).

    `Range: bytes=N-` resumes a cut download: the bytes are regenerated from the seeds."""
    start = range_start(range)
    lease, size, chunks = service.work.copy_download(token, lease_id, start)
    headers = {"Accept-Ranges": "bytes"}
    if range is None:
        return service.work.streams.response(lease.id, lease.token_hash, chunks, size, headers=headers)
    headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
    return service.work.streams.response(lease.id, lease.token_hash, chunks, size - start, status_code=206,
                                         headers=headers)


@router.put(
    "/leases/{lease_id}/delta", response_model=UploadAccepted,
    openapi_extra={"requestBody": {"required": True, "content": BINARY}},
)
async def upload_delta(
    lease_id: str, request: Request, token: WorkerToken, service: Service, kind: UploadKind = UploadKind.DELTA,
) -> UploadAccepted:
    """Upload the update of every tensor, as safetensors: `kind=delta` (the default) the float32 delta
    trained − received; `kind=trained` the trained weights in the copy's dtypes (a bf16 model's
    upload is then its bf16 size, exact when the worker trained in the model's dtype)."""
    declared = request.headers.get("content-length")
    return await service.uploads.upload(
        token, lease_id, kind, request.stream(), int(declared) if declared and declared.isdigit() else None
    )
