"""The work protocol: leases of copies, heartbeats, give-backs, and the downloads a lease allows.

A lease is granted in one store transaction that also checks the job is running in that round;
expired leases are swept at the start of every call that reads lease state, so an expired
lease's copy is offered again before anything else happens.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Callable, Iterator

from pum.common.codec import total_size
from pum.common.errors import Conflict, Forbidden, LeaseExpired, NotFound, RangeNotSatisfiable
from pum.common.schemas import Heartbeat, LeaseDone, LeaseGranted, LeaseWait, Released, Revoked, TaskSpec
from pum.common.states import END_STATES, TAKES_UPLOADS, JobState, LeaseState

from .context import ServerContext
from .lifecycle import sanitize_reason
from .rounds import copy_chunks, published_layout, round_noise
from .store import Lease
from .streams import CopyStreams
from .tokens import worker_job

log = logging.getLogger(__name__)
WAIT_PAUSED_S = 2.0  # how long a worker of a paused (or not yet started) job waits before asking again
WAIT_BUSY_S = 1.0  # … of a running job whose copies are all out


class WorkProtocol:
    def __init__(self, ctx: ServerContext, on_given_back: Callable[[Lease], None] = lambda lease: None):
        """`on_given_back(lease)` runs after a worker gave a copy back (the lifecycle counts failures)."""
        self.ctx = ctx
        self._on_given_back = on_given_back
        self.streams = CopyStreams(ctx.settings.max_concurrent_copies)

    def lease(self, token: str) -> LeaseGranted | LeaseWait | LeaseDone:
        job_id, token_hash = worker_job(self.ctx, token)
        job = self.ctx.job(job_id)
        if job.state in END_STATES:
            return LeaseDone(job_state=job.state)
        if job.state is not JobState.RUNNING:
            return LeaseWait(retry_after_s=WAIT_PAUSED_S, job_state=job.state)
        settings = job.spec.settings
        self.expire()
        ttl_s = min(self.ctx.settings.lease_ttl_s, self.ctx.settings.lease_max_age_s)
        lease = self.ctx.store.grant_lease(
            "lease-" + secrets.token_urlsafe(16), job_id, job.round, token_hash, ttl_s, settings.per_token_copy_cap,
        )
        if lease is None:
            return LeaseWait(retry_after_s=WAIT_BUSY_S, job_state=job.state)
        log.info("job %s round %d: granted %s", job_id, job.round, lease.id, extra=self.fields(lease))
        task = TaskSpec(
            method=settings.inner_handler, epochs=settings.local_epochs, max_steps=settings.local_max_steps,
            rounds=settings.rounds_R, reparameterized=settings.use_orthogonal_reparam,
            hyperparams=job.spec.hyperparams, prompt_format=settings.prompt_format,
        )
        return LeaseGranted(
            lease_id=lease.id, job_id=job_id, task_name=job.task, round=job.round, rounds_R=settings.rounds_R,
            ttl_s=ttl_s, task=task, public_files=self.ctx.files(job_id).public_names(),
        )

    def heartbeat(self, token: str, lease_id: str) -> Heartbeat:
        """Extend the lease by the TTL, never past its maximum age (then it expires, heartbeats or not,
        and its copy is offered again: a token cannot hold a copy for ever)."""
        lease = self.live_lease(token, lease_id)
        ttl_s = min(self.ctx.settings.lease_ttl_s, lease.created_at + self.ctx.settings.lease_max_age_s - self.ctx.clock())
        if ttl_s <= 0 or not self.ctx.store.extend_lease(lease.id, ttl_s):
            raise LeaseExpired(f"lease {lease.id} ended while renewing it: ask for a new lease")
        return Heartbeat(lease_id=lease.id, ttl_s=ttl_s)

    def revoke(self, job_id: str, lease_id: str) -> Revoked:
        """The admin ends a live lease: its copy is offered again, its worker's next call gets 410."""
        self.ctx.job(job_id)
        lease = self.ctx.store.lease(lease_id)
        if lease is None or lease.job_id != job_id:
            raise NotFound(f"job {job_id} has no lease {lease_id[:40]!r}: GET /v1/jobs/{job_id} lists its copies")
        if self.ctx.store.revoke_lease(lease.id) is None:
            raise Conflict(f"lease {lease.id} is {self.ctx.store.lease(lease.id).state}: only an active lease is revoked")
        self.streams.cut([lease.id])
        log.warning("job %s: %s revoked by the admin; its copy goes back to the pool", job_id, lease.id)
        return Revoked(job_id=job_id, leases=[lease.id])

    def release(self, token: str, lease_id: str, reason: str) -> Released:
        """A worker gives its copy back (failure or shutdown); the copy is offered again."""
        lease = self.live_lease(token, lease_id)
        reason = sanitize_reason(reason)
        log.warning("job %s: %s given back by its worker: %s", lease.job_id, lease.id, reason,
                    extra=self.fields(lease, reason=reason))
        ended = self.ctx.store.release_lease(lease.id, failed=True, reason=reason)
        self.ctx.metrics.failed("given_back")
        if ended is not None:
            self._on_given_back(ended)
        return Released()

    def public_file(self, token: str, name: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of a public file (config, tokenizer) of the token's job."""
        job_id, _ = worker_job(self.ctx, token)
        files = self.ctx.files(job_id)
        if name not in files.public_names():
            raise NotFound(f"no file {name[:100]!r}")
        return files.size(files.public(name)), self.ctx.metrics.counted("file", files.chunks(files.public(name)))

    def copy_download(self, token: str, lease_id: str, start: int = 0) -> tuple[Lease, int, Iterator[bytes]]:
        """(the lease, the copy's total size in bytes, chunks from byte `start` on) of the lease's
        published copy; send them with `self.streams`, which generates them on the copy threads."""
        lease = self.live_lease(token, lease_id)
        job = self.ctx.job(lease.job_id)
        files = self.ctx.files(job.id)
        layout = published_layout(files, lease.round, job.spec.dtypes)
        size = total_size(layout)
        if not 0 <= start < size:
            raise RangeNotSatisfiable(f"range start {start} is outside the copy's {size} bytes")
        sigmas, taus = round_noise(self.ctx.store.round(job.id, lease.round), job.spec.settings)
        chunks = copy_chunks(files, self.ctx.key(job.id), job.spec, lease.round, lease.k, sigmas, taus, layout, start)
        return lease, size, self._served(lease, chunks, start)

    def _served(self, lease: Lease, chunks: Iterator[bytes], start: int) -> Iterator[bytes]:
        """The copy's chunks, counted as served; a stream that ran to its end is logged, and a whole
        one (not resumed) is one observation of copy generation time."""
        began, sent = time.perf_counter(), 0
        for chunk in self.ctx.metrics.counted("copy", chunks):
            sent += len(chunk)
            yield chunk
        seconds = time.perf_counter() - began
        if start == 0:
            self.ctx.metrics.copy_seconds.observe(seconds)
        log.info("job %s round %d: served %s (%d bytes in %.2f s)", lease.job_id, lease.round, lease.id, sent, seconds,
                 extra=self.fields(lease, bytes=sent, seconds=seconds))

    def fields(self, lease: Lease, **more) -> dict:
        """A lease's fields for a structured log line (`pum.common.logs`): job, round, copy, lease, worker."""
        worker = self.ctx.store.token_labels(lease.job_id).get(lease.token_hash)
        return {"job": lease.job_id, "round": lease.round, "copy": lease.k, "lease": lease.id, "worker": worker, **more}

    # ---- lease checks ------------------------------------------------------------------------
    def live_lease(self, token: str, lease_id: str) -> Lease:
        """The token's own lease, still live; NotFound, Forbidden, Conflict or LeaseExpired otherwise."""
        job_id, token_hash = worker_job(self.ctx, token)
        lease = self.ctx.store.lease(lease_id)
        if lease is None or lease.job_id != job_id:
            raise NotFound(f"unknown lease {lease_id[:40]!r} for this token: ask for a new lease")
        if lease.token_hash != token_hash:
            raise Forbidden("this lease was granted to another worker token")
        return self.check_current(lease)

    def check_current(self, lease: Lease) -> Lease:
        """The lease as it is now, if it may still upload."""
        self.expire()
        current = self.ctx.store.lease(lease.id)
        if current.state is LeaseState.DONE:
            raise Conflict(f"lease {lease.id} was already uploaded and accepted: a copy counts once")
        if current.state is LeaseState.EXPIRED:
            raise LeaseExpired(f"lease {lease.id} expired (no heartbeat within {self.ctx.settings.lease_ttl_s:g} s, "
                               f"or older than the maximum lease age {self.ctx.settings.lease_max_age_s:g} s): "
                               "ask for a new lease")
        if current.state is LeaseState.REVOKED:
            raise LeaseExpired(f"lease {lease.id} was revoked by the admin: ask for a new lease (a revoked token "
                               "gets none)")
        if current.state is not LeaseState.ACTIVE:
            raise LeaseExpired(f"lease {lease.id} is {current.state}: ask for a new lease")
        job = self.ctx.job(current.job_id)
        if job.state not in TAKES_UPLOADS:
            raise Conflict(f"job {job.id} is {job.state}: no uploads are taken")
        return current

    def expire(self) -> None:
        for lease in self.ctx.store.expire_leases():
            log.warning("job %s: %s expired; its copy goes back to the pool", lease.job_id, lease.id,
                        extra=self.fields(lease, reason="lease_expired"))
            self.ctx.metrics.failed("lease_expired")
