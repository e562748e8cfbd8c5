"""Copy streams: copies generated on threads of their own and sent without holding any other thread.

A copy is a plain iterator of chunks (`rounds.copy_chunks`). Each `next()` runs on one of
`max_concurrent_copies` copy threads, so copy work never occupies the threads that answer leases,
heartbeats and admin calls (the pool of the sync routes); sending a chunk awaits the socket on the
event loop and holds no thread at all. A stream holds a *slot* from before its first chunk to its
end (its generator keeps a few times the largest tensor in memory); further streams wait their
turn in order, holding nothing but a coroutine.

However a stream ends — complete, the client gone (`http.disconnect`), cut off for not reading
(the connection guard's send timeout, `serving.py`), or the server shutting down — its generator is
closed (its `finally` runs) and its slot freed at once, or as soon as the chunk being generated is
done: never left to the garbage collector.
One stream per lease at a time: a second download of a lease while one is open is refused (409).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pum.common.errors import Conflict


class Slots:
    """An async semaphore that any event loop may wait on (the test client runs a loop per request;
    asyncio's own semaphore binds to one), fair between holders: a freed slot goes to the waiter
    whose key (a worker token) holds the fewest slots, the longest-waiting first among equals — so
    one token's many downloads cannot keep another token waiting for more than one turn."""

    def __init__(self, n: int):
        self._free = n
        self._held: dict[str, int] = {}
        self._waiters: list[tuple[str, asyncio.AbstractEventLoop, asyncio.Future]] = []  # oldest first
        self._lock = threading.Lock()

    async def acquire(self, key: str) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free and not self._waiters:
                self._take(key)
                return
            waiter = (key, loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter[2]
        except BaseException:
            with self._lock:
                queued = waiter in self._waiters
                if queued:
                    self._waiters.remove(waiter)
            if not queued and waiter[2].done() and not waiter[2].cancelled():
                self.release(key)  # handed a slot while being cancelled: pass it on
            raise

    def release(self, key: str) -> None:
        with self._lock:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]
            self._free += 1
            if not self._waiters:
                return
            waiter = min(self._waiters, key=lambda w: self._held.get(w[0], 0))  # min keeps the oldest of equals
            self._waiters.remove(waiter)
            self._take(waiter[0])
        key, loop, future = waiter
        try:
            loop.call_soon_threadsafe(self._hand_over, key, future)
        except RuntimeError:  # its loop has closed (the server is shutting down): to the next one
            self.release(key)

    def _take(self, key: str) -> None:
        self._free -= 1
        self._held[key] = self._held.get(key, 0) + 1

    def _hand_over(self, key: str, future: asyncio.Future) -> None:
        if future.cancelled():
            self.release(key)
        else:
            future.set_result(None)


class CopyStreams:
    """The copy threads, the slots, and the leases with a stream open."""

    def __init__(self, copies_at_once: int):
        self.slots = Slots(copies_at_once)
        self.threads = ThreadPoolExecutor(copies_at_once, "pum-copy")
        self._open: dict[str, _CopyResponse] = {}  # by lease
        self._guard = threading.Lock()

    @property
    def open(self) -> int:
        """Streams open now (waiting for a slot or sending)."""
        with self._guard:
            return len(self._open)

    def response(self, lease_id: str, holder: str, chunks: Iterator[bytes], size: int, status_code: int = 200,
                 headers: dict | None = None) -> Response:
        """The ASGI response that streams `chunks` (`size` bytes) of the lease to `holder` (its token's
        hash: slots are shared fairly between tokens); Conflict while another download of the lease is open."""
        with self._guard:
            if lease_id in self._open:
                _close(chunks)
                raise Conflict(f"lease {lease_id} is already downloading its copy: one download per lease "
                               "at a time (a cut download is resumed with Range once it has ended)")
            response = self._open[lease_id] = _CopyResponse(self, lease_id, holder, chunks, size, status_code,
                                                            headers or {})
        return response

    def cut(self, lease_ids: list[str]) -> None:
        """End the open streams of these leases (revoked: their slots go to other workers now)."""
        with self._guard:
            responses = [self._open[lease] for lease in lease_ids if lease in self._open]
        for response in responses:
            response.cut()

    def _ended(self, lease_id: str) -> None:
        with self._guard:
            self._open.pop(lease_id, None)

    def close(self) -> None:
        self.threads.shutdown(wait=True, cancel_futures=True)


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


class _CopyResponse(Response):
    media_type = "application/octet-stream"

    def __init__(self, streams: CopyStreams, lease_id: str, holder: str, chunks: Iterator[bytes], size: int,
                 status_code: int, headers: dict):
        super().__init__(None, status_code, {"Content-Length": str(size), **headers})
        self.streams, self.lease_id, self.holder, self.chunks = streams, lease_id, holder, chunks
        self._in_flight: Future | None = None
        self._has_slot = self._ended = self._cut = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancel: anyio.CancelScope | None = None

    def cut(self) -> None:
        """End the stream from any thread (a revoked lease); the connection is dropped unfinished."""
        if self._cancel is not None:
            self._loop.call_soon_threadsafe(self._cancel.cancel)
        else:
            self._cut = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                self._loop, self._cancel = asyncio.get_running_loop(), group.cancel_scope
                if self._cut:
                    group.cancel_scope.cancel()
                async def pump() -> None:
                    await self._pump(send)
                    group.cancel_scope.cancel()

                group.start_soon(pump)
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()  # the client went away: stop generating
        finally:
            self._end()

    async def _pump(self, send: Send) -> None:
        await self.streams.slots.acquire(self.holder)
        self._has_slot = True
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        while (chunk := await self._next()) is not None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        self._end()  # before the last message: a client that has every byte may download again at once
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _next(self) -> bytes | None:
        self._in_flight = self.streams.threads.submit(next, self.chunks, None)
        return await asyncio.wrap_future(self._in_flight)

    def _end(self) -> None:
        """Close the generator, free the slot and the lease; once. A chunk still being generated
        (a running generator cannot be closed) is left to finish on its copy thread, which then
        closes the generator: nothing here waits, so neither a cancellation nor the loop's end can
        skip it."""
        if self._ended:
            return
        self._ended = True
        if self._in_flight is not None and not self._in_flight.cancel():
            self._in_flight.add_done_callback(lambda _: self._close())  # runs now if it is done already
        else:
            self._close()

    def _close(self) -> None:
        try:
            _close(self.chunks)
        finally:
            if self._has_slot:
                self.streams.slots.release(self.holder)
            self.streams._ended(self.lease_id)
