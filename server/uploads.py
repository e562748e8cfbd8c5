"""Uploads: receive a worker's delta into a spool blob, then fold it into the round exactly once.

Receiving is async (the body arrives on the event loop) but every blocking step — the store's
lease checks, parsing, finiteness checks, blob writes, the merge — runs on the upload threads:
a pool of `upload_threads` threads of their own, at a lower CPU priority than the threads that
answer leases and heartbeats, so those answer quickly however many uploads are in flight (see
bench/lease_latency.py). Merging runs under the job's lock: the new S1 blob is written, then
`accept_copy` commits it with S0 and the copy's state in one transaction.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator, Callable, TypeVar

import torch

from pum.common.codec import SafetensorsFileWriter, StreamParser, TensorInfo, total_size
from pum.common.errors import InvalidInput, PayloadTooLarge, RequestTimeout
from pum.common.schemas import UploadAccepted

from .blobs import BlobWriter
from .context import ServerContext
from .job_files import JobFiles
from .lifecycle import Lifecycle
from .metrics import reason_of
from .rounds import merge_spooled, published_layout
from .store import Lease
from .work import WorkProtocol

log = logging.getLogger(__name__)
BATCH_BYTES = 1 << 20
UPLOAD_NICENESS = 10  # how much lower the upload threads' CPU priority is (Linux: per thread)
T = TypeVar("T")


@dataclass(frozen=True)
class Spooled:
    """A received, validated delta waiting to be merged."""

    lease: Lease
    name: str  # its spool blob in the job's files


class _Spool:
    """One upload being written to its spool blob while it is parsed and checked."""

    def __init__(self, files: JobFiles, lease: Lease, layout: list[TensorInfo], max_header_bytes: int, received):
        self.files, self.lease, self.received = files, lease, received  # received: the bytes counter
        self.bytes_in = 0  # bytes of the body so far
        self.parser = StreamParser(expected={i.name: i for i in layout}, max_header_bytes=max_header_bytes,
                                   max_total_bytes=total_size(layout))
        self.name = files.spool(lease.id + "-" + secrets.token_hex(4))
        # scratch: atomic but not synced, start-up deletes every spool anyway
        self.blob: BlobWriter = files.create(self.name, durable=False)
        self.committed = False
        try:
            self.writer = SafetensorsFileWriter(self.blob.file, layout)
        except BaseException:
            self.blob.abort()
            raise

    def feed(self, chunks: list[bytes]) -> None:
        size = sum(len(c) for c in chunks)
        self.received.inc(size)
        self.bytes_in += size
        for chunk in chunks:
            for info, tensor in self.parser.feed(chunk):
                _check_finite(info.name, tensor)
                self.writer.write(info.name, tensor)

    def finish(self) -> None:
        self.parser.finish()
        self.writer.close()
        self.blob.commit()
        self.committed = True

    def abort(self) -> None:
        """Leave no trace: the partial blob, or the whole one when the upload failed after it."""
        self.writer.abort()
        self.blob.abort()
        if self.committed:
            self.files.delete(self.name)


class Uploads:
    def __init__(self, ctx: ServerContext, work: WorkProtocol, lifecycle: Lifecycle):
        self.ctx, self.work, self.lifecycle = ctx, work, lifecycle
        self._threads = ThreadPoolExecutor(ctx.settings.upload_threads, "pum-upload", initializer=_lower_priority)

    async def _run(self, function: Callable[..., T], *args) -> T:
        """`function(*args)` on an upload thread."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(function, *args))

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    def delta_layout(self, job_id: str, round_: int) -> list[TensorInfo]:
        """What an upload must contain: every tensor of the copy, in float32."""
        layout = published_layout(self.ctx.files(job_id), round_, {})
        return [TensorInfo(i.name, "F32", i.shape) for i in layout]

    async def receive(self, token: str, lease_id: str, chunks: AsyncIterable[bytes], declared: int | None) -> Spooled:
        """Validate and spool an upload; nothing touches S0/S1 yet."""
        metrics = self.ctx.metrics
        try:
            spool = await self._run(self._open, token, lease_id, declared)
        except Exception as err:
            metrics.failed("upload_" + reason_of(err))
            raise
        began = time.perf_counter()
        try:
            async for group in _batched(_idle_timeout(chunks, self.ctx.settings.upload_idle_timeout_s)):
                await self._run(spool.feed, group)
            await self._run(spool.finish)
            # the whole delta is in: renew the lease so a merge queued behind others does not outlive it
            await self._run(self.ctx.store.extend_lease, spool.lease.id, self.ctx.settings.lease_ttl_s)
        except BaseException as err:
            spool.abort()  # closes and unlinks a file: short enough for the loop, and safe when cancelled
            reason = "upload_" + (reason_of(err) if isinstance(err, Exception) else "cut")
            metrics.failed(reason)
            log.warning("job %s round %d: upload of %s refused (%s)", spool.lease.job_id, spool.lease.round,
                        spool.lease.id, reason, extra=self.work.fields(spool.lease, reason=reason))
            raise
        seconds = time.perf_counter() - began
        metrics.upload_seconds.observe(seconds)
        log.info("job %s round %d: received the delta of %s (%d bytes in %.2f s)", spool.lease.job_id,
                 spool.lease.round, spool.lease.id, spool.bytes_in, seconds,
                 extra=self.work.fields(spool.lease, bytes=spool.bytes_in, seconds=seconds))
        return Spooled(spool.lease, spool.name)

    def _open(self, token: str, lease_id: str, declared: int | None) -> _Spool:
        lease = self.work.live_lease(token, lease_id)
        layout = self.delta_layout(lease.job_id, lease.round)
        expected = total_size(layout)
        if declared is not None and declared > expected:
            raise PayloadTooLarge(f"upload of {declared} bytes exceeds the {expected} bytes a float32 delta of this model takes")
        return _Spool(self.ctx.files(lease.job_id), lease, layout, self.ctx.settings.max_header_bytes,
                      self.ctx.metrics.received)

    async def merge(self, spooled: Spooled) -> UploadAccepted:
        """`merge_now` on an upload thread."""
        try:
            return await self._run(self.merge_now, spooled)
        except Exception as err:
            self.ctx.metrics.failed("merge_" + reason_of(err))
            raise

    def merge_now(self, spooled: Spooled) -> UploadAccepted:
        """Fold a spooled upload into the round, atomically; steps the round when it is complete."""
        files = self.ctx.files(spooled.lease.job_id)
        try:
            with self.ctx.lock(spooled.lease.job_id):
                lease = self.work.check_current(spooled.lease)
                job = self.ctx.job(lease.job_id)
                settings = job.spec.settings
                rnd = self.ctx.store.round(job.id, lease.round)
                began = time.perf_counter()
                s0, s1 = merge_spooled(
                    files, self.ctx.key(job.id), settings, lease.round, lease.k, spooled.name, rnd.s0, rnd.accepted
                )
                try:
                    self.ctx.store.accept_copy(lease, s0, s1.rsplit("/", 1)[-1])
                except BaseException:
                    files.delete(s1)  # never committed: the round keeps its previous S1
                    raise
                if rnd.accepted:
                    files.delete(files.s1(lease.round, rnd.accepted))
                seconds = time.perf_counter() - began
                self.ctx.metrics.merge_seconds.observe(seconds)
                log.info("job %s round %d: accepted %s (%d/%d)", job.id, lease.round, lease.id, rnd.accepted + 1,
                         settings.copies_m, extra=self.work.fields(lease, seconds=seconds))
                if rnd.accepted + 1 == settings.copies_m and settings.auto_advance:
                    self.lifecycle.step(self.ctx.job(job.id))
        finally:
            files.delete(spooled.name)
        job = self.ctx.job(spooled.lease.job_id)
        return UploadAccepted(job_state=job.state, round=job.round)


async def _idle_timeout(chunks: AsyncIterable[bytes], seconds: float) -> AsyncIterator[bytes]:
    """The chunks, or RequestTimeout when the client sends nothing for `seconds`."""
    iterator = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), seconds)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestTimeout(f"upload stalled: nothing received for {seconds:g} s; send the delta again") from None
        yield chunk


async def _batched(chunks: AsyncIterable[bytes], size: int = BATCH_BYTES) -> AsyncIterator[list[bytes]]:
    """The body's chunks in groups of at least `size` bytes (the last may be smaller): one thread
    hop per group instead of one per network read of ~64 KiB, and no copy on the event loop."""
    group, held = [], 0
    async for chunk in chunks:
        group.append(chunk)
        held += len(chunk)
        if held >= size:
            yield group
            group, held = [], 0
    if group:
        yield group


def _lower_priority() -> None:
    """Run the calling thread at a lower CPU priority (Linux sets niceness per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + UPLOAD_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: same priority as the rest
        pass


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise InvalidInput(f"tensor {name} has NaN or Inf values: upload finite deltas")
