"""Copy streams (server/streams.py): a stream's generator is closed and its slot freed the moment it
ends, however it ends (never at garbage collection); one stream per lease; slots are shared fairly
between tokens; copies are generated on the copy threads, never the threads of the sync routes."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from pum.common.errors import Conflict
from pum.server.streams import CopyStreams, Slots


class Chunks:
    """A copy-like generator that records on which thread it ran and whether its `finally` ran."""

    def __init__(self, n: int = 50, size: int = 1000):
        self.n, self.size, self.closed, self.threads = n, size, False, set()

    def __iter__(self):
        try:
            for _ in range(self.n):
                self.threads.add(threading.current_thread().name)
                yield b"x" * self.size
        finally:
            self.closed = True


class Client:
    """The ASGI side of one connection: it reads `reads` body messages, then goes away."""

    def __init__(self, reads: int | None = None):
        self.reads, self.messages, self.gone = reads, [], asyncio.Event()
        self.on_last = None

    async def send(self, message):
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body") and self.on_last:
            self.on_last()
        if self.reads is not None and len(self.messages) > self.reads:
            self.gone.set()
            await asyncio.sleep(3600)  # a send that never completes: the client stopped reading

    async def receive(self):
        await self.gone.wait()
        return {"type": "http.disconnect"}


def stream(streams: CopyStreams, client: Client, chunks, lease="L1", holder="tok"):
    response = streams.response(lease, holder, iter(chunks), chunks.n * chunks.size)
    return response({"type": "http"}, client.receive, client.send)


def test_a_client_that_goes_away_closes_the_generator_and_frees_the_slot_at_once():
    streams, chunks, client = CopyStreams(1), Chunks(), Client(reads=3)
    gc.disable()  # the old stream freed its slot only when the collector found the generator
    try:
        asyncio.run(stream(streams, client, chunks))
        assert chunks.closed and streams.open == 0
        assert streams.slots._free == 1 and not streams.slots._held
    finally:
        gc.enable()
        streams.close()
    assert 3 <= len(client.messages) < chunks.n  # it stopped generating


def test_a_complete_stream_frees_its_lease_before_the_last_byte():
    streams, chunks = CopyStreams(1), Chunks(n=5)
    client = Client()
    seen = []
    client.on_last = lambda: seen.append((streams.open, chunks.closed))
    client.gone.set = lambda: None  # never disconnects on its own

    async def run():
        task = asyncio.ensure_future(stream(streams, client, chunks))
        while not seen:
            await asyncio.sleep(0.01)
        client.gone.set = asyncio.Event.set.__get__(client.gone)
        client.gone.set()
        await task

    asyncio.run(run())
    streams.close()
    assert seen == [(0, True)]  # a worker with every byte may download again at once
    body = b"".join(m.get("body", b"") for m in client.messages if m["type"] == "http.response.body")
    assert body == b"x" * 5000 and client.messages[0]["status"] == 200


def test_copies_are_generated_on_the_copy_threads():
    streams, chunks, client = CopyStreams(2), Chunks(n=3), Client()
    client.on_last = client.gone.set
    asyncio.run(stream(streams, client, chunks))
    streams.close()
    assert chunks.threads and all(name.startswith("pum-copy") for name in chunks.threads)


def test_one_download_per_lease_at_a_time():
    streams = CopyStreams(2)
    first = Chunks()
    streams.response("L1", "tok", iter(first), 10)
    second = Chunks()
    it = iter(second)
    next(it)
    with pytest.raises(Conflict, match="one download per lease"):
        streams.response("L1", "tok", it, 10)
    assert second.closed  # the refused stream's generator is closed too
    streams.response("L2", "tok", iter(Chunks()), 10)  # another lease may
    assert streams.open == 2
    streams.close()


def test_slots_go_first_to_the_token_that_holds_fewest():
    async def run():
        slots, order = Slots(2), []
        await slots.acquire("hoarder")
        await slots.acquire("hoarder")

        async def wait(key):
            await slots.acquire(key)
            order.append(key)

        waiting = [asyncio.ensure_future(wait(k)) for k in ("hoarder", "hoarder", "worker")]
        await asyncio.sleep(0.01)
        assert order == []
        slots.release("hoarder")
        await asyncio.sleep(0.01)
        assert order == ["worker"]  # not the hoarder's older request
        slots.release("hoarder")
        await asyncio.sleep(0.01)
        assert order == ["worker", "hoarder"]
        waiting[1].cancel()  # a cancelled waiter gives nothing back it did not get
        await asyncio.sleep(0.01)
        slots.release("worker")
        slots.release("hoarder")
        await asyncio.sleep(0.01)
        assert slots._free == 2 and not slots._held

    asyncio.run(run())


def test_a_cut_stream_ends_and_frees_its_slot():
    """A revoked lease's download ends at once (cut from another thread), freeing its slot."""
    streams, chunks = CopyStreams(1), Chunks()
    client = Client(reads=3)
    stalled = asyncio.Event()
    client.gone.set = stalled.set  # it stops reading but never goes away: only the cut can end it

    async def run():
        task = asyncio.ensure_future(stream(streams, client, chunks))
        await stalled.wait()
        assert streams.open == 1 and streams.slots._free == 0
        await asyncio.to_thread(streams.cut, ["L1", "L-other"])
        await asyncio.wait_for(task, 5)

    asyncio.run(run())
    streams.close()
    assert chunks.closed and streams.open == 0 and streams.slots._free == 1
