"""The request gate: an ASGI middleware that decides, before one byte of a body is read, whether the
body may come at all, how large it may be and how long it may take.

- Authentication first: a request with a body to /v1/ must carry a bearer token this server knows
  (401 otherwise, the body unread and the connection closed). FastAPI parses a JSON body before it
  runs the route's dependencies, so without the gate a 200 MiB body from anyone would be parsed
  before the 401. The route's own dependencies still decide the role (admin or worker: 403).
- A cap per route: a JSON route's body is read here, whole, up to `max_json_body_bytes` (413
  otherwise, with Content-Length checked before reading) and within `body_timeout_s` (408), then
  handed to the route. A route in `STREAMED` takes its body as a stream and bounds it itself: the
  delta upload by the size the lease's copy dictates and by `upload_idle_timeout_s` (uploads.py).
"""

from __future__ import annotations

import re
import time

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pum.common.errors import PayloadTooLarge, PumError, RequestTimeout, Unauthorized
from pum.common.schemas import ErrorBody

from .auth import is_admin
from .tokens import hash_token

# Routes whose handler reads (and bounds) its body as a stream, by method and path.
STREAMED = (("PUT", re.compile(r"/v1/work/leases/[^/]+/delta")),)


class RequestGate:
    def __init__(self, app: ASGIApp, max_json_body_bytes: int, body_timeout_s: float):
        self.app, self.cap, self.timeout_s = app, max_json_body_bytes, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            return await self.app(scope, receive, send)
        try:
            if scope["path"].startswith("/v1/"):
                await _check_token(scope)
            if _streamed(scope):
                return await self.app(scope, receive, send)
            body = await self._read_body(scope, receive)
        except PumError as err:
            response = JSONResponse(ErrorBody(detail=str(err)).model_dump(), err.status, {"Connection": "close"})
            return await response(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.cap:
            raise _too_large(self.cap)
        parts, size = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())) as timer:
                message = await receive()
            if timer.cancelled_caught:
                raise RequestTimeout(f"the request body did not arrive within {self.timeout_s:g} s: send it "
                                     "without pauses")
            if message["type"] == "http.disconnect":
                raise RequestTimeout("the client went away while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.cap:
                raise _too_large(self.cap)
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


def _too_large(cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body over {cap} bytes: this route takes small JSON bodies only")


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body, read already, as one message; then what the connection says (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length.strip() not in ("", "0"))


def _streamed(scope: Scope) -> bool:
    return any(scope["method"] == method and path.fullmatch(scope["path"]) for method, path in STREAMED)


async def _check_token(scope: Scope) -> None:
    """Unauthorized unless the bearer token is the admin's or a live worker token (a store lookup,
    on a thread: the store may wait for a lock)."""
    service = scope["app"].state.service
    scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if is_admin(service, token or None):
        return
    if not token:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>' (the body was not read)")
    if await anyio.to_thread.run_sync(service.store.token_job, hash_token(token)) is None:
        raise Unauthorized("unknown token: send the admin token or a worker token of a job (the body was not read)")

