"""Uploads: receive a worker's update into its round's folder, then accept it exactly once.

Receiving is async (the body arrives on the event loop) but every blocking step — the store's
lease checks, parsing, the value checks, blob writes — runs on the upload threads: a pool of
`upload_threads` threads of their own, at a lower CPU priority than the threads that answer
leases and heartbeats, so those answer quickly however many uploads are in flight (see
bench/lease_latency.py).

An upload is written once, durably, to `rounds/r{r}/upload_{lease}` while it is parsed and
checked (and, with update clipping, its Σx² per layer group taken, kept in the store with the
copy); accepting it is one store transaction (the copy and its lease), under the job's lock.
Nothing is summed before the round is complete: the step reads each accepted upload once, in
the copies' order k (`pum.server.rounds.step`). So each accepted copy costs one write and one
read of its upload (2× its size of disk I/O), the merged model does not depend on the order the
uploads arrived in, and a crash loses no accepted upload. The price is disk space: the round
keeps all m uploads until its step (m × the upload size; see README, "Disk").
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator, Callable, Iterator, TypeVar

import torch

from pum.common.aggregate import extremes, group_totals, harmonic_weight, sum_of_squares
from pum.common.codec import SafetensorsFileWriter, StreamParser, TensorInfo, build_header, total_size
from pum.common.errors import Conflict, InsufficientStorage, InvalidInput, PayloadTooLarge, RequestTimeout
from pum.common.schemas import UploadAccepted, UploadKind

from .blobs import BlobWriter
from .context import ServerContext
from .job_files import JobFiles
from .lifecycle import Lifecycle
from .metrics import reason_of
from .rounds import copy_noise, received_update, round_noise, upload_layout
from .store import Lease
from .work import WorkProtocol

log = logging.getLogger(__name__)
BATCH_BYTES = 1 << 20
UPLOAD_NICENESS = 10  # how much lower the upload threads' CPU priority is (Linux: per thread)
HEADER_SLACK = 4096  # bytes an upload's header may exceed the expected one by (a small __metadata__)
MAX_ABS_VALUE = 1e30  # |x| of an uploaded value: m ≤ 10⁸ weighted terms (w_k ≤ 1) stay far from float32's 3.4e38
T = TypeVar("T")


@dataclass(frozen=True)
class Received:
    """A received, validated upload, durable in its round's folder, not yet accepted."""

    lease: Lease
    name: str  # its blob in the job's files
    update_sums: dict[str, float] | None = None  # Σx² of Δ' per layer group, when update clipping needs them


class _Receiving:
    """One upload being written to its blob while it is parsed and checked."""

    def __init__(self, files: JobFiles, lease: Lease, layout: list[TensorInfo], kind: UploadKind, max_header_bytes: int,
                 received):
        self.files, self.lease, self.received = files, lease, received  # received: the bytes counter
        self.layout = layout
        self.bytes_in = 0  # bytes of the body so far
        self.resources = ExitStack()  # closed when the upload ends, either way
        self.update: Callable[[TensorInfo, torch.Tensor], torch.Tensor] | None = None  # Δ' of a tensor, to clip
        self.tensor_sums: dict[str, float] = {}  # Σx² of each tensor's Δ' (float64), with `update`
        header = len(build_header(layout))
        self.parser = StreamParser(expected={i.name: i for i in layout},
                                   max_header_bytes=min(max_header_bytes, header + HEADER_SLACK),
                                   max_total_bytes=total_size(layout) + HEADER_SLACK)
        self.name = files.upload(lease.round, lease.id)
        self.blob: BlobWriter = files.create(self.name)
        self.committed = False
        try:
            self.writer = SafetensorsFileWriter(self.blob.file, layout, {"kind": kind.value})
        except BaseException:
            self.blob.abort()
            raise

    def feed(self, chunks: list[bytes]) -> None:
        size = sum(len(c) for c in chunks)
        self.received.inc(size)
        self.bytes_in += size
        for chunk in chunks:
            for info, tensor in self.parser.feed(chunk):
                check_values(info.name, tensor)
                self.writer.write(info.name, tensor)
                if self.update is not None:  # after the write: `update` may change the tensor in place
                    self.tensor_sums[info.name] = sum_of_squares(self.update(info, tensor))

    def finish(self) -> dict[str, float] | None:
        """Commit the blob; the upload's Σx² per layer group when they were taken."""
        self.parser.finish()
        self.writer.close()
        self.blob.commit()
        self.committed = True
        self.resources.close()
        # per group in the layout's order: the bits group_sum_squares gives at the step
        return group_totals([i.name for i in self.layout], self.tensor_sums.__getitem__) if self.update is not None else None

    def abort(self) -> None:
        """Leave no trace: the partial blob, or the whole one when the upload failed after it."""
        self.resources.close()
        self.writer.abort()
        self.blob.abort()
        if self.committed:
            self.files.delete(self.name)


class Uploads:
    def __init__(self, ctx: ServerContext, work: WorkProtocol, lifecycle: Lifecycle):
        self.ctx, self.work, self.lifecycle = ctx, work, lifecycle
        self._threads = ThreadPoolExecutor(ctx.settings.upload_threads, "pum-upload", initializer=_lower_priority)
        self._guard = threading.Lock()
        self._in_flight: dict[str, int] = {}  # lease id → the bytes its upload may take on disk

    async def _run(self, function: Callable[..., T], *args) -> T:
        """`function(*args)` on an upload thread."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(function, *args))

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    def layout(self, job_id: str, round_: int, kind: UploadKind = UploadKind.DELTA) -> list[TensorInfo]:
        """What an upload of `kind` must contain (`pum.server.rounds.upload_layout`)."""
        return upload_layout(self.ctx.files(job_id), round_, self.ctx.job(job_id).spec.dtypes, kind)

    async def upload(self, token: str, lease_id: str, kind: UploadKind, chunks: AsyncIterable[bytes],
                     declared: int | None) -> UploadAccepted:
        """Receive an upload and accept it; one upload per lease at a time (409 for a second)."""
        await self._run(self.work.live_lease, token, lease_id)  # the token's own live lease, before it is held
        with self._one_per_lease(lease_id):
            received = await self.receive(token, lease_id, kind, chunks, declared)
            try:
                return await self._run(self.accept, received)
            except Exception as err:
                self.ctx.metrics.failed("merge_" + reason_of(err))
                raise

    @contextmanager
    def _one_per_lease(self, lease_id: str) -> Iterator[None]:
        with self._guard:
            if lease_id in self._in_flight:
                raise Conflict(f"an upload for lease {lease_id[:40]} is already in progress: wait for its answer")
            self._in_flight[lease_id] = 0
        try:
            yield
        finally:
            with self._guard:
                del self._in_flight[lease_id]

    async def receive(self, token: str, lease_id: str, kind: UploadKind, chunks: AsyncIterable[bytes],
                      declared: int | None) -> Received:
        """Validate and store an upload; the round does not count it yet. A full disk is 507, no trace left."""
        try:
            return await self._receive(token, lease_id, kind, chunks, declared)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise InsufficientStorage("the server's disk filled up while storing this upload: send it again later") from None

    async def _receive(self, token: str, lease_id: str, kind: UploadKind, chunks: AsyncIterable[bytes],
                       declared: int | None) -> Received:
        metrics = self.ctx.metrics
        try:
            receiving = await self._run(self._open, token, lease_id, kind, declared)
        except Exception as err:
            metrics.failed("upload_" + reason_of(err))
            raise
        began = time.perf_counter()
        try:
            async for group in _batched(idle_timeout(chunks, self.ctx.settings.upload_idle_timeout_s)):
                await self._run(receiving.feed, group)
            update_sums = await self._run(receiving.finish)
            # the whole upload is in: renew the lease so an acceptance queued behind others does not outlive it
            await self._run(self.ctx.store.extend_lease, receiving.lease.id, self.ctx.settings.lease_ttl_s)
        except BaseException as err:
            receiving.abort()  # closes and unlinks a file: short enough for the loop, and safe when cancelled
            reason = "upload_" + (reason_of(err) if isinstance(err, Exception) else "cut")
            metrics.failed(reason)
            lease = receiving.lease
            log.warning("job %s round %d: upload of %s refused (%s)", lease.job_id, lease.round, lease.id, reason,
                        extra=self.work.fields(lease, reason=reason))
            raise
        seconds = time.perf_counter() - began
        metrics.upload_seconds.observe(seconds)
        lease = receiving.lease
        log.info("job %s round %d: received the %s upload of %s (%d bytes in %.2f s)", lease.job_id, lease.round,
                 kind.value, lease.id, receiving.bytes_in, seconds,
                 extra=self.work.fields(lease, bytes=receiving.bytes_in, seconds=seconds))
        return Received(lease, receiving.name, update_sums)

    def _open(self, token: str, lease_id: str, kind: UploadKind, declared: int | None) -> _Receiving:
        lease = self.work.live_lease(token, lease_id)
        files = self.ctx.files(lease.job_id)
        layout = self.layout(lease.job_id, lease.round, kind)
        expected = total_size(layout)
        if declared is not None and declared > expected + HEADER_SLACK:
            raise PayloadTooLarge(f"upload of {declared} bytes exceeds the {expected} bytes a {kind} upload of this model takes")
        with self._guard:  # what the uploads in flight may still write counts as taken
            files.blobs.check_space(expected + sum(self._in_flight.values()), "storing this upload")
            if lease_id in self._in_flight:
                self._in_flight[lease_id] = expected
        receiving = _Receiving(files, lease, layout, kind, self.ctx.settings.max_header_bytes, self.ctx.metrics.received)
        spec = self.ctx.job(lease.job_id).spec
        if spec.settings.update_clipping_enabled:
            # the clipping norms are taken now, so the step reads the upload once (pum.server.rounds.accepted_updates)
            try:
                sigmas, taus = round_noise(self.ctx.store.round(lease.job_id, lease.round), spec.settings)
                receiving.update = receiving.resources.enter_context(received_update(
                    files, self.ctx.key(lease.job_id), spec, lease.round, lease.k, kind is UploadKind.TRAINED, sigmas, taus))
            except BaseException:
                receiving.abort()
                raise
        return receiving

    def accept(self, received: Received) -> UploadAccepted:
        """Count a received upload in its round, atomically; steps the round when it is complete."""
        files = self.ctx.files(received.lease.job_id)
        accepted = False
        try:
            with self.ctx.lock(received.lease.job_id):
                lease = self.work.check_current(received.lease)
                job = self.ctx.job(lease.job_id)
                settings = job.spec.settings
                rnd = self.ctx.store.round(job.id, lease.round)
                began = time.perf_counter()
                s0 = rnd.s0 + harmonic_weight(copy_noise(self.ctx.key(job.id), settings, lease.round, lease.k).alpha)
                self.ctx.store.accept_copy(lease, s0, received.name.rsplit("/", 1)[-1], received.update_sums)
                accepted = True
                seconds = time.perf_counter() - began
                self.ctx.metrics.merge_seconds.observe(seconds)
                log.info("job %s round %d: accepted %s (%d/%d)", job.id, lease.round, lease.id, rnd.accepted + 1,
                         settings.copies_m, extra=self.work.fields(lease, seconds=seconds))
                if rnd.accepted + 1 == settings.copies_m and settings.auto_advance:
                    try:
                        self.lifecycle.step(self.ctx.job(job.id))
                    except InsufficientStorage as err:  # the upload is safe; the job waits, paused, for space
                        log.warning("job %s round %d: step deferred: %s", job.id, lease.round, err)
        finally:
            if not accepted:
                files.delete(received.name)
        job = self.ctx.job(received.lease.job_id)
        return UploadAccepted(job_state=job.state, round=job.round)


async def idle_timeout(chunks: AsyncIterable[bytes], seconds: float) -> AsyncIterator[bytes]:
    """The chunks, or RequestTimeout when the client sends nothing for `seconds`.

    One deadline moved at each chunk (asyncio.wait_for made a task per chunk: thousands per
    upload on the event loop); it is off while the consumer holds a chunk, so only the client's
    silence counts."""
    loop = asyncio.get_running_loop()
    iterator = chunks.__aiter__()
    try:
        async with asyncio.timeout(None) as deadline:
            while True:
                deadline.reschedule(loop.time() + seconds)
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    return
                deadline.reschedule(None)
                yield chunk
    except TimeoutError:
        raise RequestTimeout(f"upload stalled: nothing received for {seconds:g} s; send the delta again") from None


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


def check_values(name: str, tensor: torch.Tensor) -> None:
    """Finite, and small enough that no weighted sum of m of them overflows float32 (one pass: `extremes`)."""
    low, high = extremes(tensor)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidInput(f"tensor {name} has NaN or Inf values: upload finite values")
    largest = max(-low, high)
    if largest > MAX_ABS_VALUE:
        raise InvalidInput(f"tensor {name} has a value of magnitude {largest:.3g}, over the {MAX_ABS_VALUE:g} "
                           "an update may have: check the training")
