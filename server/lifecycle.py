"""A job from creation to its end: the admin actions, stepping rounds, the export, failure.

Every change of a job's state runs under the job's lock and is checked twice: against the
action's allowed states (`ACTIONS`, for a message that says what the job is), and by the store
against `JOB_TRANSITIONS`, in the transaction that writes it.
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from pum.common.aliases import canonical_job
from pum.common.errors import Conflict, InsufficientStorage, InvalidInput, PumError
from pum.common.hub import resolve_local
from pum.common.methods_catalog import check_task
from pum.common.model_files import is_task_name
from pum.common.settings import PumSettings
from pum.common.states import ACTIONS, END_STATES, TAKES_UPLOADS, CopyState, JobAction, JobState, LeaseState, RoundState

from .context import ServerContext
from .job_setup import create_job_files
from .model_io import export_model
from .rounds import AcceptedUpload, model_sized_writes, prepare_round, round_noise, step
from .store import Job, JobSpec, Lease, Store
from .store.base import not_ended, task_taken

log = logging.getLogger(__name__)
REASON_CHARS = 300  # of each worker's reason kept and shown
# what a worker's message could carry that is nobody else's business: bearer tokens, PUM worker tokens
_SECRET = re.compile(r"(?i)(bearer\s+\S+|pumw_[A-Za-z0-9_\-]+|authorization:\s*\S+)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]+")


def sanitize_reason(text: str) -> str:
    """A worker's reason as the admin may read it: tokens redacted, control characters (newlines
    included: one log line per reason) replaced by a space, at most REASON_CHARS characters."""
    text = _UNPRINTABLE.sub(" ", _SECRET.sub("[redacted]", text)).strip()
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


class Lifecycle:
    def __init__(self, ctx: ServerContext):
        self.ctx = ctx
        self._actions = {  # start is `act`'s own: its heavy part runs before the lock
            JobAction.PAUSE: self._set(JobState.PAUSED),
            JobAction.RESUME: self._resume, JobAction.ABORT: self._set(JobState.ABORTED),
            JobAction.ADVANCE: self._advance, JobAction.FINALIZE: self._finalize,
        }

    def create(self, task: str, model_dir: str, pum: dict, hyperparams: dict) -> Job:
        """Validate the settings, ingest the model folder, write the job's files; the job is `created`."""
        if not is_task_name(task):
            raise InvalidInput(f"task {task!r} must be 1–100 letters, digits, '.', '_' or '-' (it names a folder)")
        pum, hyperparams = canonical_job(pum, hyperparams)  # open-unlearning's names → PUM's
        settings = PumSettings.from_spec(pum)
        check_task(settings.inner_handler, hyperparams, settings.retain)  # what every worker would refuse
        if settings.seed is not None and not self.ctx.settings.dev_mode:
            raise InvalidInput(
                "seed is refused on this server: a seeded job's α, noise seeds and transforms follow from the seed, "
                "so a worker can regenerate the noise and strip it from its copy; remove seed (or start the server "
                "with --dev, for tests only)")
        owner = next((job.id for job in self.ctx.store.jobs() if job.task == task), None)
        if owner is not None:  # before the model is read; insert_job checks again, atomically
            raise task_taken(task, owner)
        source = resolve_local(model_dir, "model_dir")  # a folder, or a Hugging Face id in the local cache
        job_id = "job-" + secrets.token_hex(6)
        files = self.ctx.files(job_id)
        try:
            prepared = create_job_files(files, source, settings)
            spec = JobSpec(model_dir=str(source), pum=settings.to_public_dict(), hyperparams=hyperparams,
                           device=self.ctx.settings.device, **prepared)
            job = self.ctx.store.insert_job(job_id, task, spec)
        except BaseException:
            files.delete_all()
            raise
        log.info("created job %s (task %s, m=%d, R=%d)", job_id, task, settings.copies_m, settings.rounds_R,
                 extra={"job": job_id, "state": str(job.state)})
        return job

    def act(self, job_id: str, action: JobAction) -> Job:
        """Run an admin action (start, pause, resume, abort, advance, finalize) under the job's lock.

        `start`'s heavy part, round 1's center and z̄ (m noise draws of the model's size), runs before
        the lock is taken, so an abort never waits behind it; under the lock the state is checked
        again and the round committed (a start that lost to an abort is 409)."""
        prepared = None
        if action is JobAction.START:
            job = _allowed(self.ctx.job(job_id), action)
            prepared = self.prepare_round(job, 1)
        with self.ctx.lock(job_id):
            job = _allowed(self.ctx.job(job_id), action)
            if prepared is not None:
                self.commit_round(job, 1, *prepared)
                self.ctx.store.set_job_state(job.id, JobState.RUNNING)
            else:
                self._actions[action](job)
        job = self.ctx.job(job_id)
        log.info("job %s: %s; it is %s", job_id, action, job.state, extra={"job": job_id, "state": str(job.state)})
        return job

    def delete(self, job_id: str) -> Job:
        """Remove an ended job: its records, its state blobs and the model it exported, so its task
        can be used again. Conflict for a job that has not ended (abort it first)."""
        with self.ctx.lock(job_id):
            job = self.ctx.job(job_id)
            if job.state not in END_STATES:
                raise not_ended(job)
            # files first, the record last: a crash between leaves an ended job that a second
            # DELETE removes, never blobs that no record points to
            files = self.ctx.files(job_id)
            exported = ["model.safetensors", *files.public_names()] if job.output_dir else []
            for name in exported:  # only what the export wrote: a worker on this host may save beside it
                self.ctx.saves.delete(f"{job.task}/{name}")
            files.delete_all()
            job = self.ctx.store.delete_job(job_id)
        self.ctx.forget_lock(job_id)
        log.info("deleted job %s (task %s, %s)", job_id, job.task, job.state, extra={"job": job_id})
        return job

    def copy_given_back(self, lease: Lease) -> None:
        """After a worker gave `lease` back: the job fails once its copy was given back
        max_copy_failures times, with those workers' reasons (GET /v1/jobs/{id} shows them)."""
        with self.ctx.lock(lease.job_id):
            job = self.ctx.job(lease.job_id)
            limit = job.spec.settings.max_copy_failures
            copy = next((c for c in self.ctx.store.copies(job.id, lease.round) if c.k == lease.k), None)
            if job.state not in TAKES_UPLOADS or copy is None or copy.failures < limit:
                return
            reasons = failure_reasons(self.ctx.store, job.id, lease.round, lease.k)
            error = (f"copy {lease.k} of round {lease.round} was given back {copy.failures} times "
                     f"(max_copy_failures={limit}); last reason: {reasons[-1] if reasons else 'none given'}")
            self.ctx.store.set_job_state(job.id, JobState.FAILED, error=error)
        log.error("job %s failed: %s", job.id, error)

    # ---- the actions (the job's lock is held) ------------------------------------------------
    def _set(self, target: JobState):
        def action(job: Job) -> None:
            self.ctx.store.set_job_state(job.id, target)

        return action

    def _resume(self, job: Job) -> None:
        """Hand out leases again; a complete round whose step was deferred (disk full) steps now."""
        job = self.ctx.store.set_job_state(job.id, JobState.RUNNING)
        if job.spec.settings.auto_advance:
            self.finish_round(job)

    def _advance(self, job: Job) -> None:
        """Apply the step of a complete round (jobs with auto_advance off)."""
        current = self.ctx.store.round(job.id, job.round)
        m = job.spec.settings.copies_m
        if current.accepted < m:
            raise Conflict(f"round {job.round} has {current.accepted} of {m} copies: all are needed to step")
        self.finish_round(job)

    def _finalize(self, job: Job) -> None:
        """Save θ as of the last completed round and end the job (a partial round is discarded)."""
        self.export(job, job.round)

    # ---- rounds (the job's lock is held) -------------------------------------------------------
    def step(self, job: Job) -> None:
        """Apply θ ← θ + η·S1/S0 for the current round, then open the next one or finalize.

        An I/O error (a full disk) changes nothing the round needs: its uploads stay, the job is
        paused with the reason, and `resume` (or `advance`) tries again (`finish_round`; 507 meanwhile)."""
        files = self.ctx.files(job.id)
        rnd = self.ctx.store.round(job.id, job.round)
        uploads = [AcceptedUpload(c.k, files.upload(job.round, c.lease_id), c.update_sums)
                   for c in self.ctx.store.copies(job.id, job.round) if c.state is CopyState.ACCEPTED]
        try:
            files.blobs.check_space(model_sized_writes(files, job.spec, job.round), f"the step of round {job.round}")
            sigmas, taus = round_noise(rnd, job.spec.settings)
            began = time.perf_counter()
            step(files, self.ctx.key(job.id), job.spec, job.round, uploads, sigmas, taus)
            seconds = time.perf_counter() - began
            self.ctx.metrics.step_seconds.observe(seconds)
            self.ctx.store.finish_round(job.id, job.round)
            log.info("job %s round %d: step applied in %.2f s", job.id, job.round, seconds,
                     extra={"job": job.id, "round": job.round, "seconds": seconds})
            files.delete_folder(files.round_dir(job.round))
            self.after_step(job)
        except (OSError, InsufficientStorage) as err:
            self._defer_step(job, err)
        except PumError:
            raise
        except Exception as err:
            log.exception("job %s failed in round %d", job.id, job.round,
                          extra={"job": job.id, "round": job.round, "reason": "step_failed"})
            self.ctx.metrics.failed("step_failed")
            self.ctx.store.set_job_state(job.id, JobState.FAILED, error=f"{type(err).__name__} in round {job.round}")
            raise

    def finish_round(self, job: Job) -> None:
        """Whatever a complete round still lacks: its step, or (stepped already) the next round or the export."""
        current = self.ctx.store.round(job.id, job.round) if job.round else None
        if current is None:
            return
        if current.state is RoundState.MERGED:
            try:
                self.after_step(job)
            except (OSError, InsufficientStorage) as err:
                self._defer_step(job, err)
        elif current.accepted == job.spec.settings.copies_m:
            self.step(job)

    def _defer_step(self, job: Job, err: Exception) -> None:
        """Keep the complete round for a later try: pause the job with the reason; raise 507."""
        reason = str(err) if isinstance(err, InsufficientStorage) else \
            f"an I/O error in the step of round {job.round} ({err.strerror or type(err).__name__})"
        log.warning("job %s round %d: step deferred: %s", job.id, job.round, reason)
        if self.ctx.job(job.id).state is JobState.RUNNING:
            self.ctx.store.set_job_state(job.id, JobState.PAUSED, error=f"step deferred: {reason}; resume to retry")
        raise InsufficientStorage(f"{reason}; the round is kept: free space, then resume or advance the job") from None

    def after_step(self, job: Job) -> None:
        """Open the round after a merged one, or export the model after the last."""
        if job.round < job.spec.settings.rounds_R:
            self.open_round(job, job.round + 1)
        else:
            self.export(job, job.round + 1)

    def open_round(self, job: Job, round_: int) -> None:
        self.commit_round(job, round_, *self.prepare_round(job, round_))

    def prepare_round(self, job: Job, round_: int) -> tuple[dict[str, float], dict[str, float]]:
        """Write a round's center and z̄ (the heavy part), after checking the disk has room for them."""
        files = self.ctx.files(job.id)
        files.blobs.check_space(model_sized_writes(files, job.spec, round_), f"opening round {round_}")
        return prepare_round(files, self.ctx.key(job.id), job.spec, round_)

    def commit_round(self, job: Job, round_: int, sigmas: dict[str, float], taus: dict[str, float]) -> None:
        """Open a prepared round (its center and z̄ written) in the store."""
        self.ctx.store.open_round(job.id, round_, job.spec.settings.copies_m, sigmas, taus)
        if round_ > 1:
            files = self.ctx.files(job.id)
            files.delete(files.theta(round_ - 1))

    def export(self, job: Job, theta_round: int) -> None:
        """Save θ of `theta_round` as the merged model and end the job as finalized."""
        files = self.ctx.files(job.id)
        where = export_model(files, files.theta(theta_round), job.spec.dtypes, self.ctx.saves, job.task,
                             job.spec.shard_bytes)
        self.ctx.store.set_job_state(job.id, JobState.FINALIZED, output_dir=where)
        for name in files.list():  # the model now lives in the saves folder
            if name.startswith("theta_r"):
                files.delete(name)
        files.delete_folder("rounds")


def failure_reasons(store: Store, job_id: str, round_: int, k: int) -> list[str]:
    """The reasons of the failed leases of one copy, oldest first (already sanitised)."""
    return [lease.reason for lease in store.leases(job_id)
            if (lease.round, lease.k, lease.state) == (round_, k, LeaseState.FAILED)]


def _allowed(job: Job, action: JobAction) -> Job:
    """The job, if `action` may start from its state; Conflict saying what it is otherwise."""
    sources = ACTIONS[action].sources
    if job.state not in sources:
        raise Conflict(f"cannot {action} job {job.id}: it is {job.state} (allowed from {', '.join(sorted(sources))})")
    return job
