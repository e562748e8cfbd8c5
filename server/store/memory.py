"""The in-memory store: the same operations over dicts under one lock (fast unit tests, throwaway
servers). Each method checks everything before it changes anything, so a refused write leaves
no trace, like a rolled-back transaction."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import replace
from typing import Callable

from pum.common.states import (
    COPY_TRANSITIONS, END_STATES, JOB_TRANSITIONS, LEASE_TRANSITIONS, ROUND_TRANSITIONS, CopyState, JobState,
    LeaseState, RoundState, allowed,
)

from .base import copy_not_held, no_job, not_ended, task_taken, transition_refused
from .records import Copy, Job, JobSpec, Lease, Round


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._tokens: dict[str, tuple[str, str, str]] = {}  # hash → (job id, party, label)
        self._revoked: set[str] = set()  # hashes of revoked tokens (kept in _tokens for the privacy accounting)
        self._rounds: dict[tuple[str, int], Round] = {}
        self._copies: dict[tuple[str, int, int], Copy] = {}
        self._leases: dict[str, Lease] = {}  # in the order granted

    def close(self) -> None:
        pass

    # ---- jobs ------------------------------------------------------------------------------
    def insert_job(self, job_id: str, task: str, spec: JobSpec) -> Job:
        with self._lock:
            if job_id in self._jobs:
                raise ValueError(f"job {job_id} exists")
            owner = next((j.id for j in self._jobs.values() if j.task == task), None)
            if owner is not None:
                raise task_taken(task, owner)
            now = self.clock()
            self._jobs[job_id] = Job(job_id, task, JobState.CREATED, 0, spec, now, now, None, None)
            return self._jobs[job_id]

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created_at)  # stable: insertion order on ties

    def delete_job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise no_job(job_id)
            if job.state not in END_STATES:
                raise not_ended(job)
            del self._jobs[job_id]
            for table in (self._rounds, self._copies):
                for key in [key for key in table if key[0] == job_id]:
                    del table[key]
            for token in [t for t, (owner, *_) in self._tokens.items() if owner == job_id]:
                del self._tokens[token]
            for lease in [l.id for l in self._leases.values() if l.job_id == job_id]:
                del self._leases[lease]
            return job

    def set_job_state(self, job_id: str, target: JobState, *, error: str | None = None,
                      output_dir: str | None = None) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or not allowed(JOB_TRANSITIONS, job.state, target):
                raise transition_refused(job, job_id, target)
            job = replace(job, state=target, updated_at=self.clock(), error=error if error is not None else job.error,
                          output_dir=output_dir if output_dir is not None else job.output_dir)
            self._jobs[job_id] = job
            if target in END_STATES:
                for lease in [l for l in self._leases.values() if l.job_id == job_id]:
                    self._end_lease(lease, LeaseState.CANCELLED, failed=False)
            return job

    # ---- tokens ----------------------------------------------------------------------------
    def insert_token(self, token_hash: str, job_id: str, label: str, party: str = "") -> None:
        with self._lock:
            if token_hash in self._tokens:
                raise ValueError("token exists")
            self._tokens[token_hash] = (job_id, party, label)

    def token_parties(self, job_id: str) -> dict[str, int]:
        with self._lock:
            parties = [party for job, party, _ in self._tokens.values() if job == job_id]
        return {party: parties.count(party) for party in parties}

    def token_job(self, token_hash: str) -> str | None:
        with self._lock:
            if token_hash in self._revoked:
                return None
            return self._tokens.get(token_hash, (None,))[0]

    def token_labels(self, job_id: str) -> dict[str, str]:
        with self._lock:
            return {h: label for h, (job, _, label) in self._tokens.items() if job == job_id}

    def revoke_tokens(self, job_id: str, label: str) -> tuple[int, list[Lease]]:
        with self._lock:
            hashes = {h for h, (job, _, its_label) in self._tokens.items()
                      if job == job_id and its_label == label and h not in self._revoked}
            self._revoked |= hashes
            due = [l for l in self._leases.values() if l.token_hash in hashes and l.state is LeaseState.ACTIVE]
            ended = [self._leases[l.id] for l in due if self._end_lease(l, LeaseState.REVOKED, failed=False)]
            return len(hashes), ended

    # ---- rounds and copies -------------------------------------------------------------------
    def open_round(self, job_id: str, round_: int, m: int, sigmas: dict[str, float], taus: dict[str, float]) -> Round:
        with self._lock:
            if (job_id, round_) in self._rounds:
                raise ValueError(f"round {round_} of {job_id} exists")
            now = self.clock()
            rnd = Round(job_id, round_, RoundState.OPEN, 0.0, 0, None, dict(sigmas), now, None, dict(taus))
            self._rounds[(job_id, round_)] = rnd
            for k in range(m):
                self._copies[(job_id, round_, k)] = Copy(job_id, round_, k, CopyState.PENDING, None, 0, 0, None, None)
            self._jobs[job_id] = replace(self._jobs[job_id], round=round_, updated_at=now)
            return rnd

    def round(self, job_id: str, round_: int) -> Round | None:
        with self._lock:
            return self._rounds.get((job_id, round_))

    def rounds(self, job_id: str) -> list[Round]:
        with self._lock:
            return sorted((r for r in self._rounds.values() if r.job_id == job_id), key=lambda r: r.round)

    def finish_round(self, job_id: str, round_: int) -> None:
        with self._lock:
            rnd = self._rounds.get((job_id, round_))
            if rnd is not None and allowed(ROUND_TRANSITIONS, rnd.state, RoundState.MERGED):
                self._rounds[(job_id, round_)] = replace(rnd, state=RoundState.MERGED, finished_at=self.clock())

    def copies(self, job_id: str, round_: int) -> list[Copy]:
        with self._lock:
            return sorted((c for c in self._copies.values() if (c.job_id, c.round) == (job_id, round_)),
                          key=lambda c: c.k)

    # ---- leases ------------------------------------------------------------------------------
    def grant_lease(self, lease_id: str, job_id: str, round_: int, token_hash: str, ttl_s: float,
                    cap: int | None) -> Lease | None:
        with self._lock:
            now = self.clock()
            job = self._jobs.get(job_id)
            if job is None or job.state is not JobState.RUNNING or job.round != round_:
                return None
            if cap is not None:
                held = {l.k for l in self._leases.values()
                        if (l.job_id, l.round, l.token_hash) == (job_id, round_, token_hash)}
                if len(held) >= cap:
                    return None
            free = [c for c in self.copies(job_id, round_) if allowed(COPY_TRANSITIONS, c.state, CopyState.LEASED)]
            if not free:
                return None
            copy = secrets.choice(free)
            self._copies[(job_id, round_, copy.k)] = replace(
                copy, state=CopyState.LEASED, lease_id=lease_id, leases=copy.leases + 1, leased_at=now)
            lease = Lease(lease_id, job_id, round_, copy.k, token_hash, LeaseState.ACTIVE, now, now + ttl_s)
            self._leases[lease_id] = lease
            return lease

    def lease(self, lease_id: str) -> Lease | None:
        with self._lock:
            return self._leases.get(lease_id)

    def leases(self, job_id: str) -> list[Lease]:
        with self._lock:
            return [l for l in self._leases.values() if l.job_id == job_id]

    def expire_leases(self) -> list[Lease]:
        with self._lock:
            now = self.clock()
            due = [l for l in self._leases.values() if l.state is LeaseState.ACTIVE and l.expires_at < now]
            for lease in due:
                self._end_lease(lease, LeaseState.EXPIRED, failed=False)
            return due

    def _end_lease(self, lease: Lease, target: LeaseState, failed: bool) -> bool:
        if not allowed(LEASE_TRANSITIONS, lease.state, target):
            return False
        self._leases[lease.id] = replace(lease, state=target)
        key = (lease.job_id, lease.round, lease.k)
        copy = self._copies[key]
        if copy.lease_id == lease.id and allowed(COPY_TRANSITIONS, copy.state, CopyState.PENDING):
            self._copies[key] = replace(copy, state=CopyState.PENDING, lease_id=None, failures=copy.failures + failed)
        return True

    def extend_lease(self, lease_id: str, ttl_s: float) -> bool:
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.state is not LeaseState.ACTIVE:
                return False
            self._leases[lease_id] = replace(lease, expires_at=self.clock() + ttl_s)
            return True

    def release_lease(self, lease_id: str, failed: bool, reason: str = "") -> Lease | None:
        with self._lock:
            lease = self._leases.get(lease_id)
            target = LeaseState.FAILED if failed else LeaseState.RELEASED
            if lease is None or not self._end_lease(lease, target, failed):
                return None
            self._leases[lease_id] = replace(self._leases[lease_id], reason=reason)
            return self._leases[lease_id]

    def revoke_lease(self, lease_id: str) -> Lease | None:
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or not self._end_lease(lease, LeaseState.REVOKED, failed=False):
                return None
            return self._leases[lease_id]

    def accept_copy(self, lease: Lease, s0: float, s1_file: str, update_sums: dict[str, float] | None = None) -> None:
        with self._lock:
            key = (lease.job_id, lease.round, lease.k)
            copy, current = self._copies.get(key), self._leases.get(lease.id)
            if (copy is None or copy.lease_id != lease.id or current is None
                    or not allowed(COPY_TRANSITIONS, copy.state, CopyState.ACCEPTED)
                    or not allowed(LEASE_TRANSITIONS, current.state, LeaseState.DONE)):
                raise copy_not_held(lease)
            self._copies[key] = replace(copy, state=CopyState.ACCEPTED, accepted_at=self.clock(),
                                        update_sums=dict(update_sums) if update_sums is not None else None)
            self._leases[lease.id] = replace(current, state=LeaseState.DONE)
            rnd = self._rounds[(lease.job_id, lease.round)]
            self._rounds[(lease.job_id, lease.round)] = replace(rnd, s0=s0, s1_file=s1_file, accepted=rnd.accepted + 1)

    def largest_party_leases(self, job_id: str) -> int | None:
        with self._lock:
            held: dict[tuple[int, str], set[int]] = {}
            for lease in self._leases.values():
                if lease.job_id == job_id:
                    party = self._tokens.get(lease.token_hash, (None, "", ""))[1]
                    held.setdefault((lease.round, party), set()).add(lease.k)
            return max((len(ks) for ks in held.values()), default=None)
