"""The worker's side of the wire: one method per server endpoint, over a given httpx.Client.

The client is passed in (base URL and bearer token already set), so tests can hand it the
in-process app's TestClient, a MockTransport, or a real connection to uvicorn.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import httpx

from pum.common.errors import Conflict, Forbidden, InvalidInput, LeaseExpired, NotFound, PumError, Unauthorized

CHUNK = 1 << 20
_BY_STATUS = {400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 410: LeaseExpired, 413: InvalidInput}


def raise_for_status(response: httpx.Response) -> httpx.Response:
    """Turn a 4xx/5xx answer into the PUM exception of its status, with the server's message."""
    if response.is_success:
        return response
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    error = _BY_STATUS.get(response.status_code, PumError)
    raise error(f"{response.request.method} {response.request.url.path}: {response.status_code} {detail}")


class WorkerAPI:
    def __init__(self, http: httpx.Client, retries: int = 3, backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.http = http
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep

    def lease(self) -> dict:
        return raise_for_status(self.http.post("/v1/work/lease")).json()

    def heartbeat(self, lease_id: str) -> dict:
        return raise_for_status(self.http.post(f"/v1/work/leases/{lease_id}/heartbeat")).json()

    def release(self, lease_id: str, reason: str) -> None:
        raise_for_status(self.http.post(f"/v1/work/leases/{lease_id}/release", json={"reason": reason[:2000]}))

    def public_file(self, name: str, dest: Path) -> Path:
        response = raise_for_status(self.http.get(f"/v1/work/files/{name}"))
        dest.write_bytes(response.content)
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
                    if total is None:
                        total = received + int(response.headers["content-length"])
                        if on_total:
                            on_total(total)
                    with dest.open("ab") as f:
                        for chunk in response.iter_bytes():  # as received: nothing buffered is lost on a cut
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

    def upload_delta(self, lease_id: str, path: Path, progress: Callable[[int], None] | None = None) -> dict:
        """PUT the delta file; transport failures are retried with exponential backoff."""
        size = path.stat().st_size
        for attempt in range(self.retries):
            try:
                response = self.http.put(
                    f"/v1/work/leases/{lease_id}/delta",
                    content=_file_chunks(path, progress),
                    headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                )
                return raise_for_status(response).json()
            except httpx.TransportError:
                if attempt == self.retries - 1:
                    raise
                self.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def _file_chunks(path: Path, progress: Callable[[int], None] | None) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            if progress:
                progress(len(chunk))
            yield chunk
