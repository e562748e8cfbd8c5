"""The `Store` protocol: the server's durable state as domain operations, one transaction each.

The copy table is the source of truth for exactly-once merging: a copy moves pending → leased →
accepted, and `accept_copy` commits the new S0 and the new S1 blob name together with the
copy's and the lease's state, so a crash leaves either the old or the new round state, never
half of one. Every state write follows the tables of `pum.common.states`: a write the table does
not allow changes nothing (and raises `Conflict`, or returns False/None where the method says so).

Times come from the store's `clock` (seconds), read inside the transaction.
"""

from __future__ import annotations

from typing import Callable, Protocol

from pum.common.errors import Conflict, LeaseExpired, NotFound
from pum.common.states import JobState

from .records import Copy, Job, JobSpec, Lease, Round


class Store(Protocol):
    clock: Callable[[], float]

    def close(self) -> None: ...

    # ---- jobs ------------------------------------------------------------------------------
    def insert_job(self, job_id: str, task: str, spec: JobSpec) -> Job:
        """A new job in state `created`, round 0; Conflict naming the owner when another job has
        `task` (a task names the job's output folder, so one job owns it until it is deleted)."""

    def job(self, job_id: str) -> Job | None: ...

    def jobs(self) -> list[Job]:
        """All jobs, oldest first."""

    def delete_job(self, job_id: str) -> Job:
        """Remove an ended job and everything of it (tokens, rounds, copies, leases); returns what
        it was. Conflict when the job is not in an end state, NotFound when there is none."""

    def set_job_state(self, job_id: str, target: JobState, *, error: str | None = None,
                      output_dir: str | None = None) -> Job:
        """Move the job to `target` if JOB_TRANSITIONS allows it from its current state, else
        raise Conflict. Entering an end state ends the job's live leases (`cancelled`) and puts
        their copies back to pending, in the same transaction."""

    # ---- worker tokens (stored as hashes) ----------------------------------------------------
    def insert_token(self, token_hash: str, job_id: str, label: str, party: str = "") -> None:
        """`party`: the data owner the token belongs to ("" = the job's one data owner)."""

    def token_parties(self, job_id: str) -> dict[str, int]:
        """Party → number of the job's tokens in it."""

    def token_labels(self, job_id: str) -> dict[str, str]:
        """Token hash → the label it was issued with, for the job's tokens (who holds which lease)."""

    def token_job(self, token_hash: str) -> str | None:
        """The job of a token hash, or None for an unknown or revoked token."""

    def revoke_tokens(self, job_id: str, label: str) -> tuple[int, list[Lease]]:
        """Revoke the job's live tokens labelled `label` (they stop resolving; their rows stay for the
        privacy accounting) and end their active leases (`revoked`, copies back to pending), in one
        transaction; returns (tokens revoked, leases ended)."""

    # ---- rounds and copies -------------------------------------------------------------------
    def open_round(self, job_id: str, round_: int, m: int, sigmas: dict[str, float], taus: dict[str, float]) -> Round:
        """Round `round_` with m pending copies and its noise scales σ_ℓ, τ_ℓ, made the job's current round."""

    def round(self, job_id: str, round_: int) -> Round | None: ...

    def rounds(self, job_id: str) -> list[Round]: ...

    def finish_round(self, job_id: str, round_: int) -> None:
        """open → merged (its step has been applied)."""

    def copies(self, job_id: str, round_: int) -> list[Copy]:
        """The round's copies by k."""

    # ---- leases ------------------------------------------------------------------------------
    def grant_lease(self, lease_id: str, job_id: str, round_: int, token_hash: str, ttl_s: float,
                    cap: int | None) -> Lease | None:
        """Lease a uniformly random pending copy of the round (drawn with `secrets`: the order of the
        leases says nothing about the copy index k) to `token_hash` for `ttl_s` seconds; None when
        no copy is free, the job is not running in that round, or the token already got `cap`
        distinct copies of the round."""

    def lease(self, lease_id: str) -> Lease | None: ...

    def leases(self, job_id: str) -> list[Lease]:
        """Every lease of the job, in the order granted."""

    def expire_leases(self) -> list[Lease]:
        """Active leases past their expiry become `expired`, their copies pending; returns them."""

    def extend_lease(self, lease_id: str, ttl_s: float) -> bool:
        """Expiry ← now + ttl_s for an active lease; False (nothing changed) when it is not active."""

    def release_lease(self, lease_id: str, failed: bool, reason: str = "") -> Lease | None:
        """End an active lease early (`failed` or `released`, keeping the worker's `reason`) and put
        its copy back (a failure counts in the copy's `failures`); None when it was not active."""

    def revoke_lease(self, lease_id: str) -> Lease | None:
        """End an active lease (`revoked`) and put its copy back without counting a failure; None
        when it was not active."""

    def accept_copy(self, lease: Lease, s0: float, s1_file: str, update_sums: dict[str, float] | None = None) -> None:
        """Commit one merged copy: the copy (accepted, with its upload's Σx² per layer group when
        given), its lease (done), S0 and the S1 blob name change together. LeaseExpired when the
        lease no longer holds the copy."""

    def largest_party_leases(self, job_id: str) -> int | None:
        """The most distinct copies of one round the tokens of one party were leased (None: no lease yet)."""


def no_job(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id!r}: list jobs with GET /v1/jobs")


def transition_refused(job: Job | None, job_id: str, target: JobState) -> Conflict:
    """The error of a job-state write the table does not allow (shared by the implementations)."""
    if job is None:
        return Conflict(f"no job {job_id!r}")
    return Conflict(f"job {job_id} is {job.state}: it cannot become {target}")


def task_taken(task: str, owner: str) -> Conflict:
    return Conflict(f"task {task!r} belongs to job {owner}: choose another task, or delete that job "
                    f"(DELETE /v1/jobs/{owner}, pum admin delete {owner}) once it has ended")


def not_ended(job: Job) -> Conflict:
    return Conflict(f"job {job.id} is {job.state}: only an ended job (finalized, aborted, failed) can be deleted; "
                    "abort it first")


def copy_not_held(lease: Lease) -> LeaseExpired:
    return LeaseExpired(f"lease {lease.id} expired while its delta was merged: ask for a new lease")
