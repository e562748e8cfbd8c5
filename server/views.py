"""What the admin reads: jobs' records as the wire's reply models, the privacy report, the merged model."""

from __future__ import annotations

from typing import Iterator

from pum.common.codec import total_size
from pum.common.errors import Conflict, NotFound, PumError
from pum.common.schemas import CopyFailure, CopyInfo, JobStatus, JobSummary, ModelFiles, PrivacyReport, Progress, RoundInfo
from pum.common.states import END_STATES, CopyState, JobState, LeaseState, RoundState

from .context import ServerContext
from .lifecycle import failure_reasons
from .privacy import privacy_of
from .rounds import published_layout
from .store import Copy, Job, Lease


def job_summary(job: Job) -> JobSummary:
    return JobSummary(id=job.id, task=job.task, state=job.state, round=job.round, created_at=job.created_at)


def job_status(ctx: ServerContext, job_id: str) -> JobStatus:
    """State, round, settings, each round's copies with their states, workers and timings, and the progress."""
    job = ctx.job(job_id)
    settings = job.spec.settings
    now = ctx.clock()
    labels = ctx.store.token_labels(job_id)
    leases: dict[tuple[int, int], list[Lease]] = {}
    for lease in ctx.store.leases(job_id):
        leases.setdefault((lease.round, lease.k), []).append(lease)
    rounds = [
        RoundInfo(
            round=rnd.round, state=rnd.state, accepted=rnd.accepted, sigmas=rnd.sigmas, started_at=rnd.started_at,
            finished_at=rnd.finished_at, seconds=(rnd.finished_at or now) - rnd.started_at,
            copies=[copy_info(c, leases.get((rnd.round, c.k), []), labels, now)
                    for c in ctx.store.copies(job_id, rnd.round)],
        )
        for rnd in ctx.store.rounds(job_id)
    ]
    return JobStatus(
        **job_summary(job).model_dump(), rounds_R=settings.rounds_R, copies_m=settings.copies_m, error=job.error,
        output_dir=job.output_dir, updated_at=job.updated_at, settings=job.spec.pum, hyperparams=job.spec.hyperparams,
        rounds=rounds, progress=progress(ctx, job, rounds, now), failure=copy_failure(ctx, job),
    )


def copy_info(copy: Copy, leases: list[Lease], labels: dict[str, str], now: float) -> CopyInfo:
    """A copy as the admin sees it: who holds (or held) it, for how long, and how its other leases ended."""
    ends: dict[str, int] = {}
    for lease in leases:
        if lease.state not in (LeaseState.ACTIVE, LeaseState.DONE):
            ends[str(lease.state)] = ends.get(str(lease.state), 0) + 1
    latest = leases[-1] if leases else None
    held = None
    if copy.leased_at is not None and copy.state is not CopyState.PENDING:
        held = (copy.accepted_at or now) - copy.leased_at
    return CopyInfo(k=copy.k, state=copy.state, leases=copy.leases, failures=copy.failures, leased_at=copy.leased_at,
                    accepted_at=copy.accepted_at, worker=labels.get(latest.token_hash) if latest else None,
                    seconds=held, lease_ends=ends, lease_id=copy.lease_id)


def progress(ctx: ServerContext, job: Job, rounds: list[RoundInfo], now: float) -> Progress:
    """Copies accepted of m·R, the rate so far (since the first round opened) and the time left at it.

    rate = accepted / elapsed; ETA = (m·R − accepted) / rate, while the job can still take copies.
    """
    settings = job.spec.settings
    total = settings.copies_m * settings.rounds_R
    accepted = sum(r.accepted for r in rounds)
    ended = job.state in END_STATES
    elapsed = ((job.updated_at if ended else now) - rounds[0].started_at) if rounds else 0.0
    rate = accepted / elapsed if accepted and elapsed > 0 else None
    eta = (total - accepted) / rate if rate and not ended else None
    copy_bytes = None
    if not ended and rounds and rounds[-1].state is RoundState.OPEN:
        try:
            copy_bytes = total_size(published_layout(ctx.files(job.id), job.round, job.spec.dtypes))
        except (OSError, PumError):  # the round's θ is being replaced right now
            pass
    return Progress(copies_accepted=accepted, copies_total=total, seconds=max(elapsed, 0.0),
                    copies_per_hour=rate * 3600 if rate else None, eta_s=eta, copy_bytes=copy_bytes)


def copy_failure(ctx: ServerContext, job: Job) -> CopyFailure | None:
    """The copy of a failed job's round that was given back max_copy_failures times, if one was."""
    if job.state is not JobState.FAILED or not job.round:
        return None
    limit = job.spec.settings.max_copy_failures
    copy = next((c for c in ctx.store.copies(job.id, job.round) if c.failures >= limit), None)
    if copy is None:
        return None
    return CopyFailure(round=job.round, k=copy.k, failures=copy.failures,
                       reasons=failure_reasons(ctx.store, job.id, job.round, copy.k))


def privacy(ctx: ServerContext, job_id: str) -> PrivacyReport:
    """The privacy report of the job's released rounds (DESIGN.md §5)."""
    job = ctx.job(job_id)
    report = privacy_of(job, ctx.store, ctx.key(job_id))
    return PrivacyReport.model_validate(report)


def model_files(ctx: ServerContext, job_id: str) -> ModelFiles:
    return ModelFiles(files=ctx.saves.list(_finalized(ctx, job_id).task))


def model_file(ctx: ServerContext, job_id: str, name: str) -> tuple[int, Iterator[bytes]]:
    """(size, chunks) of one file of the finalized model."""
    job = _finalized(ctx, job_id)
    if name not in ctx.saves.list(job.task):
        raise NotFound(f"no file {name[:100]!r}")
    key = f"{job.task}/{name}"
    return ctx.saves.size(key), ctx.metrics.counted("model", ctx.saves.chunks(key))


def _finalized(ctx: ServerContext, job_id: str) -> Job:
    job = ctx.job(job_id)
    if job.state is not JobState.FINALIZED:
        raise Conflict(f"job {job_id} is {job.state}: the model is available once it is finalized")
    return job
