"""An upload does its blocking work (store transactions, blob writes, parsing, the merge) on the
upload threads, at a lower CPU priority, never on the event loop that answers lease requests."""

from __future__ import annotations

import asyncio
import os
import threading

import torch
from safetensors.torch import save

from pum.common.schemas import UploadKind


def test_an_upload_blocks_nothing_on_the_event_loop(server, tiny_model_dir, monkeypatch):
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1})
    token = server.token(job)
    lease = server.worker(token).post("/v1/work/lease").json()["lease_id"]
    layout = server.service.uploads.layout(job, 1)
    body = save({i.name: torch.full(tuple(i.shape), 1e-3) for i in layout})

    calls: list[tuple[str, int, int]] = []  # (what, thread, its niceness)

    def recorded(what: str, function):
        def call(*args, **kwargs):
            calls.append((what, threading.get_ident(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
            return function(*args, **kwargs)
        return call

    store, blobs = server.service.store, server.service.context.blobs
    for name in ("lease", "expire_leases", "extend_lease", "accept_copy", "round", "job", "token_job"):
        monkeypatch.setattr(store, name, recorded(f"store.{name}", getattr(store, name)))
    for name in ("create", "open", "delete"):
        monkeypatch.setattr(blobs, name, recorded(f"blobs.{name}", getattr(blobs, name)))

    async def chunks():
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]
            await asyncio.sleep(0)

    async def upload() -> tuple[int, object]:
        reply = await server.service.uploads.upload(token, lease, UploadKind.DELTA, chunks(), len(body))
        return threading.get_ident(), reply

    loop_thread, reply = asyncio.run(upload())
    during = list(calls)  # what the upload did (the checks below read the store too)
    assert reply.accepted and server.service.store.round(job, 1).accepted == 1
    assert {"store.lease", "store.extend_lease", "store.accept_copy", "blobs.create", "blobs.open"} <= {
        what for what, _, _ in during}
    assert [what for what, thread, _ in during if thread == loop_thread] == []
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert {nice for _, _, nice in during} == {min(own + 10, 19)}  # they yield the CPU to lease answers
