"""The job service: every server operation as a plain method, no HTTP.

Routes call one method each; errors are `pum.common.errors` exceptions that the edge maps to
status codes. Merges of one job are serialised by a per-job lock, and each accepted copy is
committed in one SQLite transaction together with its new S1 file, so a copy counts exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import AsyncIterable, AsyncIterator, Callable, Iterator

import torch
from starlette.concurrency import run_in_threadpool

from pum.common.codec import SafetensorsFileWriter, StreamParser, TensorInfo, total_size
from pum.common.errors import (
    Conflict, Forbidden, InvalidInput, LeaseExpired, NotFound, PumError, RangeNotSatisfiable, RequestTimeout,
    Unauthorized,
)
from pum.common.aliases import canonical_job
from pum.common.hub import resolve_local
from pum.common.model_files import is_task_name
from pum.common.schemas import TaskSpec
from pum.common.settings import PumSettings

from . import rounds as R
from .config import ServerSettings
from .job_setup import create_job_files
from .privacy import privacy_of
from .model_io import export_model, file_in
from .store import Job, Lease, Store

log = logging.getLogger(__name__)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JobService:
    def __init__(self, store: Store, settings: ServerSettings, clock: Callable[[], float] = time.time):
        self.store = store
        self.settings = settings
        self.clock = clock
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._copy_slots = threading.BoundedSemaphore(settings.max_concurrent_copies)
        self._remove_orphans()
        self.recover()

    # ---- admin: jobs -------------------------------------------------------------------
    def create_job(self, task: str, model_dir: str, pum: dict, hyperparams: dict) -> Job:
        if not is_task_name(task):
            raise InvalidInput(f"task {task!r} must be 1–100 letters, digits, '.', '_' or '-' (it names a folder)")
        pum, hyperparams = canonical_job(pum, hyperparams)  # open-unlearning's names → PUM's
        settings = PumSettings.from_spec(pum)
        if settings.seed is not None and not self.settings.dev_mode:
            raise InvalidInput(
                "seed is refused on this server: a seeded job's α, noise seeds and transforms follow from the seed, "
                "so a worker can regenerate the noise and strip it from its copy; remove seed (or start the server "
                "with --dev, for tests only)")
        source = resolve_local(model_dir, "model_dir")  # a folder, or a Hugging Face id in the local cache
        job_id = "job-" + secrets.token_hex(6)
        files = self._files(job_id)
        try:
            files.root.mkdir(parents=True)
            prepared = create_job_files(files, source, settings)
        except BaseException:
            shutil.rmtree(files.root, ignore_errors=True)
            raise
        spec = {"model_dir": str(source), "pum": settings.to_public_dict(), "hyperparams": hyperparams, **prepared}
        self.store.insert_job(job_id, task, spec)
        log.info("created job %s (task %s, m=%d, R=%d)", job_id, task, settings.copies_m, settings.rounds_R)
        return self.store.job(job_id)

    def start(self, job_id: str) -> Job:
        job = self._job_in(job_id, {"created"}, "start")
        with self._lock(job_id):
            self._open_round(job, 1)
            self.store.update_job(job_id, state="running")
        return self.store.job(job_id)

    def pause(self, job_id: str) -> Job:
        self._job_in(job_id, {"running"}, "pause")
        self.store.update_job(job_id, state="paused")
        return self.store.job(job_id)

    def resume(self, job_id: str) -> Job:
        self._job_in(job_id, {"paused"}, "resume")
        self.store.update_job(job_id, state="running")
        return self.store.job(job_id)

    def abort(self, job_id: str) -> Job:
        self._job_in(job_id, {"created", "running", "paused"}, "abort")
        with self._lock(job_id):
            self.store.end_active_leases(job_id)
            self.store.update_job(job_id, state="aborted")
        return self.store.job(job_id)

    def advance(self, job_id: str) -> Job:
        """Apply the step of a complete round (jobs with auto_advance off)."""
        job = self._job_in(job_id, {"running", "paused"}, "advance")
        with self._lock(job_id):
            current = self.store.round(job_id, job.round)
            m = self._settings(job).copies_m
            if current.accepted < m:
                raise Conflict(f"round {job.round} has {current.accepted} of {m} copies: all are needed to step")
            self._step(self.store.job(job_id))
        return self.store.job(job_id)

    def finalize(self, job_id: str) -> Job:
        """Save θ as of the last completed round and end the job (a partial round is discarded)."""
        self._job_in(job_id, {"running", "paused"}, "finalize")
        with self._lock(job_id):
            job = self.store.job(job_id)
            self.store.end_active_leases(job_id)
            self._export(job, job.round)
        return self.store.job(job_id)

    def issue_token(self, job_id: str, label: str, party: str = "") -> str:
        """A worker token; `party` names the data owner it belongs to ("" = the job's one data owner).
        The privacy report takes every token of one party as one adversary."""
        self._job(job_id)
        token = "pumw_" + secrets.token_urlsafe(32)
        self.store.insert_token(hash_token(token), job_id, label, party)
        return token

    def status(self, job_id: str) -> dict:
        job = self._job(job_id)
        settings = self._settings(job)
        rounds = []
        for rnd in self.store.rounds(job_id):
            copies = [
                {key: c[key] for key in ("k", "state", "leases", "failures", "leased_at", "accepted_at")}
                for c in self.store.copies(job_id, rnd.round)
            ]
            rounds.append({
                "round": rnd.round, "state": rnd.state, "accepted": rnd.accepted, "sigmas": rnd.sigmas,
                "started_at": rnd.started_at, "finished_at": rnd.finished_at, "copies": copies,
            })
        return {
            "id": job.id, "task": job.task, "state": job.state, "round": job.round,
            "rounds_R": settings.rounds_R, "copies_m": settings.copies_m, "error": job.error,
            "output_dir": job.output_dir, "created_at": job.created_at, "updated_at": job.updated_at,
            "settings": job.spec["pum"], "hyperparams": job.spec["hyperparams"], "rounds": rounds,
        }

    def privacy(self, job_id: str) -> dict:
        """The privacy report of the job's released rounds (DESIGN.md §5)."""
        job = self._job(job_id)
        return privacy_of(job, self.store, self._key(job_id))

    def jobs(self) -> list[Job]:
        return self.store.jobs()

    def output_file(self, job_id: str, name: str) -> Path:
        job = self._job(job_id)
        if job.state != "finalized" or not job.output_dir:
            raise Conflict(f"job {job_id} is {job.state}: the model is available once it is finalized")
        return file_in(Path(job.output_dir), name)

    def output_files(self, job_id: str) -> list[str]:
        job = self._job(job_id)
        if job.state != "finalized" or not job.output_dir:
            raise Conflict(f"job {job_id} is {job.state}: the model is available once it is finalized")
        return sorted(p.name for p in Path(job.output_dir).iterdir() if p.is_file())

    # ---- workers -----------------------------------------------------------------------
    def worker_job(self, token: str) -> tuple[str, str]:
        """(job id, token hash) of a worker token."""
        token_hash = hash_token(token)
        job_id = self.store.token_job(token_hash)
        if job_id is None:
            raise Unauthorized("unknown worker token: ask the admin for a token of this job")
        return job_id, token_hash

    def lease(self, token: str) -> dict:
        job_id, token_hash = self.worker_job(token)
        job = self._job(job_id)
        if job.state in ("finalized", "aborted", "failed"):
            return {"status": "done", "job_state": job.state}
        if job.state != "running":
            return {"status": "wait", "retry_after_s": 2.0, "job_state": job.state}
        settings = self._settings(job)
        self._expire(self.clock())
        lease = self.store.grant_lease(
            "lease-" + secrets.token_urlsafe(16), job_id, job.round, token_hash, self.clock,
            self.settings.lease_ttl_s, settings.per_token_copy_cap,
        )
        if lease is None:
            return {"status": "wait", "retry_after_s": 1.0, "job_state": job.state}
        log.info("job %s round %d: granted %s", job_id, job.round, lease.id)
        task = TaskSpec(
            method=settings.inner_handler, epochs=settings.local_epochs, max_steps=settings.local_max_steps,
            rounds=settings.rounds_R, hyperparams=job.spec["hyperparams"], prompt_format=settings.prompt_format,
        )
        return {
            "status": "leased", "lease_id": lease.id, "job_id": job_id, "task_name": job.task,
            "round": job.round, "rounds_R": settings.rounds_R, "ttl_s": self.settings.lease_ttl_s,
            "task": task.model_dump(), "public_files": self.public_files(job_id),
        }

    def heartbeat(self, token: str, lease_id: str) -> dict:
        lease = self._live_lease(token, lease_id)
        if not self.store.extend_lease(lease.id, self.clock() + self.settings.lease_ttl_s):
            raise LeaseExpired(f"lease {lease.id} ended while renewing it: ask for a new lease")
        return {"lease_id": lease.id, "ttl_s": self.settings.lease_ttl_s}

    def release(self, token: str, lease_id: str, reason: str) -> None:
        """A worker gives its copy back (failure or shutdown); the copy is offered again."""
        lease = self._live_lease(token, lease_id)
        log.warning("job %s: %s given back by its worker: %s", lease.job_id, lease.id, reason[:200])
        self.store.release_lease(lease.id, failed=True)

    def public_files(self, job_id: str) -> list[str]:
        return sorted(p.name for p in self._files(job_id).public.iterdir())

    def public_file(self, token: str, name: str) -> Path:
        job_id, _ = self.worker_job(token)
        return file_in(self._files(job_id).public, name)

    def copy_download(self, token: str, lease_id: str, start: int = 0) -> tuple[int, Iterator[bytes]]:
        """(total size in bytes, chunks from byte `start` on) of the lease's published copy."""
        lease = self._live_lease(token, lease_id)
        job = self._job(lease.job_id)
        files = self._files(job.id)
        layout = R.published_layout(files.theta(lease.round), job.spec["dtypes"])
        size = total_size(layout)
        if not 0 <= start < size:
            raise RangeNotSatisfiable(f"range start {start} is outside the copy's {size} bytes")
        settings = self._settings(job)
        sigmas, taus = R.round_noise(self.store.round(job.id, lease.round), settings)
        chunks = R.copy_chunks(files, self._key(job.id), settings, lease.round, lease.k, sigmas, taus, layout, start)
        return size, self._one_of_few(chunks)

    def _one_of_few(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Generate at most max_concurrent_copies copies at a time (the slot frees when the stream ends)."""
        with self._copy_slots:
            yield from chunks

    def delta_layout(self, job_id: str, round_: int) -> list[TensorInfo]:
        """What an upload must contain: every tensor of the copy, in float32."""
        layout = R.published_layout(self._files(job_id).theta(round_), {})
        return [TensorInfo(i.name, "F32", i.shape) for i in layout]

    async def receive_delta(self, token: str, lease_id: str, chunks: AsyncIterable[bytes], declared: int | None) -> tuple[Lease, Path]:
        """Validate and spool an upload to disk; nothing touches S0/S1 yet."""
        lease = self._live_lease(token, lease_id)
        layout = self.delta_layout(lease.job_id, lease.round)
        expected_size = total_size(layout)
        if declared is not None and declared > expected_size:
            raise _too_large(declared, expected_size)
        parser = StreamParser(
            expected={i.name: i for i in layout}, max_header_bytes=self.settings.max_header_bytes,
            max_total_bytes=expected_size,
        )
        spool = self._files(lease.job_id).spool(lease.id + "-" + secrets.token_hex(4))
        spool.parent.mkdir(parents=True, exist_ok=True)
        def spool_chunk(chunk: bytes) -> None:
            for info, tensor in parser.feed(chunk):
                _check_finite(info.name, tensor)
                writer.write(info.name, tensor)

        writer = SafetensorsFileWriter(spool, layout, private=True)
        try:
            async for chunk in _idle_timeout(chunks, self.settings.upload_idle_timeout_s):
                # parsing, checks and writes run off the event loop
                await run_in_threadpool(spool_chunk, chunk)
            parser.finish()
            await run_in_threadpool(writer.close)
        except BaseException:
            writer.abort()
            spool.unlink(missing_ok=True)
            raise
        # the whole delta is in: renew the lease so a merge queued behind others does not outlive it
        self.store.extend_lease(lease.id, self.clock() + self.settings.lease_ttl_s)
        return lease, spool

    def merge_delta(self, lease: Lease, spool: Path) -> dict:
        """Fold a spooled upload into the round, atomically; steps the round when it is complete."""
        try:
            with self._lock(lease.job_id):
                lease = self._check_lease_current(lease)
                job = self._job(lease.job_id)
                settings = self._settings(job)
                rnd = self.store.round(job.id, lease.round)
                files = self._files(job.id)
                s0, s1_path = R.merge_spooled(
                    files, self._key(job.id), settings, lease.round, lease.k, spool, rnd.s0, rnd.accepted
                )
                try:
                    self.store.accept_copy(lease, s0, s1_path.name, self.clock())
                except LeaseExpired:
                    s1_path.unlink(missing_ok=True)  # never committed: the round keeps its previous S1
                    raise
                if rnd.accepted:
                    files.s1(lease.round, rnd.accepted).unlink(missing_ok=True)
                log.info("job %s round %d: accepted %s (%d/%d)", job.id, lease.round, lease.id, rnd.accepted + 1, settings.copies_m)
                if rnd.accepted + 1 == settings.copies_m and settings.auto_advance:
                    self._step(self.store.job(job.id))
        finally:
            spool.unlink(missing_ok=True)
        job = self.store.job(lease.job_id)
        return {"accepted": True, "job_state": job.state, "round": job.round}

    # ---- internals ---------------------------------------------------------------------
    def _step(self, job: Job) -> None:
        """Apply θ ← θ + η·S1/S0 for the current round, then open the next one or finalize."""
        settings = self._settings(job)
        files = self._files(job.id)
        rnd = self.store.round(job.id, job.round)
        try:
            sigmas, taus = R.round_noise(rnd, settings)
            R.step(files, self._key(job.id), settings, job.round, rnd.s0, files.round_dir(job.round) / rnd.s1_file,
                   sigmas, taus)
            self.store.finish_round(job.id, job.round)
            shutil.rmtree(files.round_dir(job.round), ignore_errors=True)
            if job.round < settings.rounds_R:
                self._open_round(job, job.round + 1)
            else:
                self._export(job, job.round + 1)
        except PumError:
            raise
        except Exception as err:
            log.exception("job %s failed in round %d", job.id, job.round)
            self.store.update_job(job.id, state="failed", error=f"{type(err).__name__} in round {job.round}")
            raise

    def _open_round(self, job: Job, round_: int) -> None:
        settings = self._settings(job)
        files = self._files(job.id)
        sigmas, taus = R.prepare_round(files, self._key(job.id), settings, job.spec.get("clip_norms"), round_)
        self.store.open_round(job.id, round_, settings.copies_m, sigmas, taus)
        if round_ > 1:
            files.theta(round_ - 1).unlink(missing_ok=True)

    def _export(self, job: Job, theta_round: int) -> None:
        files = self._files(job.id)
        out = export_model(files.theta(theta_round), job.spec["dtypes"], files.public, self.settings.saves_dir / job.task)
        self.store.update_job(job.id, state="finalized", output_dir=str(out.resolve()))
        for path in files.root.glob("theta_r*.safetensors"):  # the model now lives in output_dir
            path.unlink()
        shutil.rmtree(files.root / "rounds", ignore_errors=True)

    def _live_lease(self, token: str, lease_id: str) -> Lease:
        job_id, token_hash = self.worker_job(token)
        lease = self.store.lease(lease_id)
        if lease is None or lease.job_id != job_id:
            raise NotFound(f"unknown lease {lease_id[:40]!r} for this token: ask for a new lease")
        if lease.token_hash != token_hash:
            raise Forbidden("this lease was granted to another worker token")
        return self._check_lease_current(lease)

    def _check_lease_current(self, lease: Lease) -> Lease:
        self._expire(self.clock())
        current = self.store.lease(lease.id)
        if current.state == "done":
            raise Conflict(f"lease {lease.id} was already uploaded and accepted: a copy counts once")
        if current.state == "expired":
            raise LeaseExpired(f"lease {lease.id} expired (no heartbeat within {self.settings.lease_ttl_s:g} s): ask for a new lease")
        if current.state != "active":
            raise LeaseExpired(f"lease {lease.id} is {current.state}: ask for a new lease")
        job = self._job(current.job_id)
        if job.state not in ("running", "paused"):
            raise Conflict(f"job {job.id} is {job.state}: no uploads are taken")
        return current

    def _expire(self, now: float) -> None:
        for lease in self.store.expire_leases(now):
            log.warning("job %s: %s expired; its copy goes back to the pool", lease.job_id, lease.id)

    def _job(self, job_id: str) -> Job:
        job = self.store.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}: list jobs with GET /v1/jobs")
        return job

    def _job_in(self, job_id: str, states: set[str], action: str) -> Job:
        job = self._job(job_id)
        if job.state not in states:
            raise Conflict(f"cannot {action} job {job_id}: it is {job.state} (allowed from {sorted(states)})")
        return job

    def _settings(self, job: Job) -> PumSettings:
        return PumSettings.from_spec(job.spec["pum"])

    def _files(self, job_id: str) -> R.JobFiles:
        return R.JobFiles(self.settings.state_dir / "jobs" / job_id)

    def _key(self, job_id: str) -> bytes:
        return self._files(job_id).key.read_bytes()

    def _lock(self, job_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(job_id, threading.Lock())

    def recover(self) -> None:
        """Finish what a crash interrupted: a complete round not yet stepped, or a step whose
        next round was not yet opened. Each part is idempotent, so redoing it is safe."""
        for job in self.store.jobs():
            if job.state not in ("running", "paused") or not job.round:
                continue
            settings = self._settings(job)
            rnd = self.store.round(job.id, job.round)
            with self._lock(job.id):
                if rnd.state == "merged":
                    if job.round < settings.rounds_R:
                        self._open_round(job, job.round + 1)
                    else:
                        self._export(job, job.round + 1)
                elif rnd.accepted == settings.copies_m and settings.auto_advance:
                    self._step(job)

    def _remove_orphans(self) -> None:
        """After a crash: spooled uploads and S1 files that no committed state points to."""
        for job in self.store.jobs():
            files = self._files(job.id)
            shutil.rmtree(files.root / "spool", ignore_errors=True)
            rnd = self.store.round(job.id, job.round) if job.round else None
            if rnd is None or rnd.state != "open":
                continue
            for path in files.round_dir(job.round).glob("s1_*.safetensors*"):
                if path.name != rnd.s1_file:
                    path.unlink()


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


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise InvalidInput(f"tensor {name} has NaN or Inf values: upload finite deltas")


def _too_large(declared: int, expected: int) -> PumError:
    from pum.common.errors import PayloadTooLarge

    return PayloadTooLarge(f"upload of {declared} bytes exceeds the {expected} bytes a float32 delta of this model takes")
