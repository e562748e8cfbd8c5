"""What the admin reads: jobs' records as the wire's reply models, the privacy report, the merged model."""

from __future__ import annotations

from typing import Iterator

from pum.common.errors import Conflict, NotFound
from pum.common.schemas import CopyInfo, JobStatus, JobSummary, ModelFiles, PrivacyReport, RoundInfo
from pum.common.states import JobState

from .context import ServerContext
from .privacy import privacy_of
from .store import Job


def job_summary(job: Job) -> JobSummary:
    return JobSummary(id=job.id, task=job.task, state=job.state, round=job.round, created_at=job.created_at)


def job_status(ctx: ServerContext, job_id: str) -> JobStatus:
    """State, round, settings, and each round's copies with their states and timings."""
    job = ctx.job(job_id)
    settings = job.spec.settings
    rounds = [
        RoundInfo(
            round=rnd.round, state=rnd.state, accepted=rnd.accepted, sigmas=rnd.sigmas, started_at=rnd.started_at,
            finished_at=rnd.finished_at,
            copies=[CopyInfo(k=c.k, state=c.state, leases=c.leases, failures=c.failures, leased_at=c.leased_at,
                             accepted_at=c.accepted_at) for c in ctx.store.copies(job_id, rnd.round)],
        )
        for rnd in ctx.store.rounds(job_id)
    ]
    return JobStatus(
        **job_summary(job).model_dump(), rounds_R=settings.rounds_R, copies_m=settings.copies_m, error=job.error,
        output_dir=job.output_dir, updated_at=job.updated_at, settings=job.spec.pum, hyperparams=job.spec.hyperparams,
        rounds=rounds,
    )


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
    return ctx.saves.size(key), ctx.saves.chunks(key)


def _finalized(ctx: ServerContext, job_id: str) -> Job:
    job = ctx.job(job_id)
    if job.state is not JobState.FINALIZED:
        raise Conflict(f"job {job_id} is {job.state}: the model is available once it is finalized")
    return job
