"""Serving the app: uvicorn, with a connection guard that bounds what a peer who never finishes can hold.

uvicorn's h11 protocol has a keep-alive timeout but no header timeout (a connection that sends half a
request, or nothing at all, is kept for ever: 1,100 of them made the server unreachable) and no send
timeout (a client that never reads keeps its response, and the app's send, waiting for ever).
`GuardedH11` adds, per connection:

- a header deadline: a request's headers must be complete within `header_timeout_s` of the
  connection opening or of its previous response, or the connection is dropped;
- a send deadline: once the write buffer is full (the peer stopped reading), the peer has
  `send_timeout_s` to drain it, or the connection is dropped; the app then sees `http.disconnect`,
  so a copy stream ends and frees its slot (streams.py);
- a connection cap: past `max_connections` open connections, the one waiting longest for its
  request's headers is dropped to make room, so idle sockets cannot lock a legitimate client out.

`serve` raises the process's soft file limit to fit the cap, and on SIGTERM uvicorn stops accepting,
lets open responses run for `shutdown_grace_s`, cancels them (streams close their generators) and
returns: the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal

from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServerSettings

log = logging.getLogger(__name__)
SPARE_FILES = 256  # file descriptors kept for the state folder, the database and blobs


class GuardedH11(H11Protocol):
    header_timeout_s = 10.0
    send_timeout_s = 30.0
    max_connections = 4096

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._await_headers()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._headers_arrived()

    def on_response_complete(self) -> None:
        self._await_headers()
        super().on_response_complete()
        self._headers_arrived()  # a pipelined request may have started already

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.send_timeout_s, self._drop, "reads nothing")

    def resume_writing(self) -> None:
        super().resume_writing()
        _cancel(self._send_deadline)
        self._send_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        _cancel(self._header_deadline)
        _cancel(self._send_deadline)
        self._header_deadline = self._send_deadline = None
        super().connection_lost(exc)

    # ---- the guard --------------------------------------------------------------------------
    def _await_headers(self) -> None:
        """Start the clock for the next request's headers (the request after `self.cycle`)."""
        _cancel(self._header_deadline)
        self._headers_of, self._waiting_since = self.cycle, self.loop.time()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._drop, "sent no complete headers")

    def _headers_arrived(self) -> None:
        if self._header_deadline is not None and self.cycle is not self._headers_of:
            self._header_deadline.cancel()
            self._header_deadline = None

    @property
    def idle(self) -> bool:
        """Waiting for a request's headers (not serving one)."""
        return self._header_deadline is not None and not self.transport.is_closing()

    def _make_room(self) -> None:
        idle = [c for c in self.connections if isinstance(c, GuardedH11) and c is not self and c.idle]
        victim = min(idle, key=lambda c: c._waiting_since) if idle else self
        victim._drop(f"is the idlest of {self.max_connections} connections")

    def _drop(self, why: str) -> None:
        if not self.transport.is_closing():
            log.info("dropped the connection of %s: it %s", _peer(self.client), why)
            self.transport.abort()  # close() would wait for ever to flush to a peer that never reads


def _cancel(handle: asyncio.TimerHandle | None) -> None:
    if handle is not None:
        handle.cancel()


def _peer(client: tuple[str, int] | None) -> str:
    return "%s:%d" % client if client else "a client"


def guarded_protocol(settings: ServerSettings, max_connections: int) -> type[GuardedH11]:
    """GuardedH11 with the settings' deadlines (uvicorn builds protocols from a class)."""
    return type("GuardedH11", (GuardedH11,), {
        "header_timeout_s": settings.header_timeout_s, "send_timeout_s": settings.send_timeout_s,
        "max_connections": max_connections,
    })


def fit_file_limit(connections: int) -> int:
    """Raise the soft limit on open files to hold `connections` sockets plus spares (within the hard
    limit); returns the connections that fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + SPARE_FILES
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    fits = max(16, soft - SPARE_FILES)
    if fits < connections:
        log.warning("open-file limit %d holds %d connections, not max_connections=%d: raise `ulimit -Hn`",
                    soft, fits, connections)
    return min(connections, fits)


def serve(app: FastAPI, settings: ServerSettings, **uvicorn_options) -> None:
    """Run `app` under uvicorn with the connection guard until SIGTERM or SIGINT (`uvicorn_options`:
    more keywords of uvicorn.Config, such as log_config)."""
    import uvicorn

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="info",
        http=guarded_protocol(settings, fit_file_limit(settings.max_connections)),
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None, **uvicorn_options,
    )
    # uvicorn re-raises the signal that stopped it once it has shut down, under the handler that was
    # there before; a SIGTERM has been honoured by then, so that handler lets the process exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
