"""The worker's side of the wire: one method per server endpoint, over a given httpx.Client.

The client is passed in (base URL and bearer token already set), so tests can hand it the
in-process app's TestClient, a MockTransport, or a real connection to uvicorn.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import httpx

from pydantic import BaseModel, TypeAdapter, ValidationError

from pum.common.errors import InvalidInput, error_for_status
from pum.common.schemas import LEASE_REPLY, ErrorBody, Heartbeat, LeaseDone, LeaseGranted, LeaseWait, UploadAccepted, UploadKind

CHUNK = 1 << 20


def raise_for_status(response: httpx.Response) -> httpx.Response:
    """Turn a 4xx/5xx answer into the PUM exception of its status (`pum.common.errors.BY_STATUS`),
    with the server's message."""
    if response.is_success:
        return response
    try:
        detail = ErrorBody.model_validate_json(response.content).detail
    except ValidationError:
        detail = response.text
    error = error_for_status(response.status_code)
    raise error(f"{response.request.method} {response.request.url.path}: {response.status_code} {detail}")


def parse(response: httpx.Response, schema: type[BaseModel] | TypeAdapter):
    """The reply parsed with its wire class (`pum.common.schemas`), after raise_for_status; a reply
    that is not one is InvalidInput naming what is wrong (a server of another version, or a hostile one)."""
    body = raise_for_status(response).content
    try:
        return schema.validate_json(body) if isinstance(schema, TypeAdapter) else schema.model_validate_json(body)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        raise InvalidInput(f"{response.request.method} {response.request.url.path}: the reply does not fit the "
                           f"wire schema: {where}: {first['msg']}") from None


class WorkerAPI:
    def __init__(self, http: httpx.Client, retries: int = 3, backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.http = http
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep

    def lease(self) -> LeaseGranted | LeaseWait | LeaseDone:
        return parse(self.http.post("/v1/work/lease"), LEASE_REPLY)

    def heartbeat(self, lease_id: str) -> Heartbeat:
        return parse(self.http.post(f"/v1/work/leases/{lease_id}/heartbeat"), Heartbeat)

    def release(self, lease_id: str, reason: str) -> None:
        raise_for_status(self.http.post(f"/v1/work/leases/{lease_id}/release", json={"reason": reason[:2000]}))

    def public_file(self, name: str, dest: Path, max_bytes: int) -> Path:
        """Save a public file to `dest`; refuses one over `max_bytes` or longer than it announced."""
        with self.http.stream("GET", f"/v1/work/files/{name}") as response:
            if not response.is_success:
                response.read()
                raise_for_status(response)
            announced = _announced(response, required=False)
            if announced is not None and announced > max_bytes:
                raise InvalidInput(f"public file {name} announces {announced} bytes, over the limit of {max_bytes}")
            limit = max_bytes if announced is None else announced
            with dest.open("wb") as f:
                for chunk in _bounded(response.iter_bytes(), limit, f"public file {name}"):
                    f.write(chunk)
        return dest

    def download_copy(self, lease_id: str, dest: Path, progress: Callable[[int], None] | None = None,
                      on_total: Callable[[int], None] | None = None) -> Path:
        """Stream the copy to `dest`; a cut connection resumes where it stopped (HTTP Range).

        `progress(n)` after each chunk of n bytes; `on_total(size)` once, when the size is known.
        """
        dest.write_bytes(b"")
        total: int | None = None
        received = 0  # counted, not stat'ed: dest may be a device such as /dev/null
        for attempt in range(self.retries):
            headers = {"Range": f"bytes={received}-"} if received else {}
            try:
                with self.http.stream("GET", f"/v1/work/leases/{lease_id}/copy", headers=headers) as response:
                    if not response.is_success:
                        response.read()
                        raise_for_status(response)
                    announced = received + _announced(response, required=True)
                    if total is not None and announced != total:
                        raise InvalidInput(f"the resumed copy announces {announced} bytes, the first answer {total}")
                    if total is None and on_total:
                        on_total(announced)
                    total = announced
                    with dest.open("ab") as f:
                        # as received: nothing buffered is lost on a cut; never past the announced size
                        for chunk in _bounded(response.iter_bytes(), total - received, "the copy"):
                            f.write(chunk)
                            received += len(chunk)
                            if progress:
                                progress(len(chunk))
            except httpx.TransportError:
                if attempt == self.retries - 1:
                    raise
                self.sleep(self.backoff_s * 2**attempt)
                continue
            if received == total:
                return dest
        raise InvalidInput(f"copy download stopped at {received} of {total} bytes after {self.retries} tries")

    def upload_delta(self, lease_id: str, path: Path, progress: Callable[[int], None] | None = None,
                     kind: UploadKind = UploadKind.DELTA) -> UploadAccepted:
        """PUT the update file (`kind`: what it holds); transport failures are retried with exponential backoff."""
        size = path.stat().st_size
        for attempt in range(self.retries):
            try:
                response = self.http.put(
                    f"/v1/work/leases/{lease_id}/delta", params={"kind": kind.value},
                    content=_file_chunks(path, progress),
                    headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                )
                return parse(response, UploadAccepted)
            except httpx.TransportError:
                if attempt == self.retries - 1:
                    raise
                self.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def _announced(response: httpx.Response, required: bool) -> int | None:
    """The Content-Length of a response (None when absent and not required)."""
    value = response.headers.get("content-length")
    if value is None or not value.isdigit():
        if required:
            raise InvalidInput(f"{response.request.url.path}: the server announced no Content-Length; refusing an unbounded body")
        return None
    return int(value)


def _bounded(chunks: Iterator[bytes], limit: int, what: str) -> Iterator[bytes]:
    """The chunks, or InvalidInput as soon as they exceed `limit` bytes in all."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise InvalidInput(f"{what} goes past {limit} bytes (its announced size or the limit): refused")
        yield chunk


def _file_chunks(path: Path, progress: Callable[[int], None] | None) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            if progress:
                progress(len(chunk))
            yield chunk
