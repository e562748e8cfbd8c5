"""The states of a job, its rounds, copies and leases, and the transitions allowed between them.

One table per kind of record; the stores refuse any write that is not in its table, and the
server and the client read the same enums (they travel as their string values on the wire).

    job     created ──start──▶ running ◀──resume/pause──▶ paused
               │                 │  └───────┬───────────────┘
               └──abort──────────┴──────────┴──▶ aborted | finalized | failed   (end states)

    round   open ──all m copies merged, step applied──▶ merged
    copy    pending ──grant──▶ leased ──upload accepted──▶ accepted
               ▲                 │
               └──lease ended────┘  (expired, given back)
    lease   active ──▶ done | expired | failed | released | cancelled
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class _StrEnum(str, Enum):
    """A str that prints as its value (Python 3.10 has no enum.StrEnum)."""

    __str__ = str.__str__
    __format__ = str.__format__


class JobState(_StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    FINALIZED = "finalized"
    ABORTED = "aborted"
    FAILED = "failed"


class RoundState(_StrEnum):
    OPEN = "open"
    MERGED = "merged"


class CopyState(_StrEnum):
    PENDING = "pending"
    LEASED = "leased"
    ACCEPTED = "accepted"


class LeaseState(_StrEnum):
    ACTIVE = "active"
    DONE = "done"  # its upload was accepted
    EXPIRED = "expired"  # no heartbeat within the TTL
    FAILED = "failed"  # the worker gave the copy back after a failure
    RELEASED = "released"  # the worker gave the copy back without a failure
    CANCELLED = "cancelled"  # the job ended while the lease was live
    REVOKED = "revoked"  # the admin ended it (or its token), or it reached the maximum lease age


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.CREATED: frozenset({JobState.RUNNING, JobState.ABORTED}),
    JobState.RUNNING: frozenset({JobState.PAUSED, JobState.ABORTED, JobState.FINALIZED, JobState.FAILED}),
    JobState.PAUSED: frozenset({JobState.RUNNING, JobState.ABORTED, JobState.FINALIZED, JobState.FAILED}),
    JobState.FINALIZED: frozenset(),
    JobState.ABORTED: frozenset(),
    JobState.FAILED: frozenset(),
}
ROUND_TRANSITIONS: dict[RoundState, frozenset[RoundState]] = {
    RoundState.OPEN: frozenset({RoundState.MERGED}),
    RoundState.MERGED: frozenset(),
}
COPY_TRANSITIONS: dict[CopyState, frozenset[CopyState]] = {
    CopyState.PENDING: frozenset({CopyState.LEASED}),
    CopyState.LEASED: frozenset({CopyState.PENDING, CopyState.ACCEPTED}),
    CopyState.ACCEPTED: frozenset(),
}
LEASE_TRANSITIONS: dict[LeaseState, frozenset[LeaseState]] = {
    LeaseState.ACTIVE: frozenset(set(LeaseState) - {LeaseState.ACTIVE}),
    **{state: frozenset() for state in LeaseState if state is not LeaseState.ACTIVE},
}

END_STATES = frozenset(state for state, targets in JOB_TRANSITIONS.items() if not targets)
# Jobs whose live leases may still upload (a paused job takes uploads, hands out no new leases).
TAKES_UPLOADS = frozenset({JobState.RUNNING, JobState.PAUSED})


def sources(table: dict, target) -> frozenset:
    """The states from which `target` may be reached in `table`."""
    return frozenset(state for state, targets in table.items() if target in targets)


def allowed(table: dict, current, target) -> bool:
    return target in table[current]


class Action(NamedTuple):
    """An admin action on a job: the states it may start from, the state it sets (None: the
    action steps a round and the state follows from that), and what it does."""

    sources: frozenset[JobState]
    target: JobState | None
    doc: str


class JobAction(_StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ADVANCE = "advance"
    FINALIZE = "finalize"


ACTIONS: dict[JobAction, Action] = {
    JobAction.START: Action(frozenset({JobState.CREATED}), JobState.RUNNING, "Open round 1 and hand out copies."),
    JobAction.PAUSE: Action(frozenset({JobState.RUNNING}), JobState.PAUSED,
                            "Stop handing out leases; uploads on live leases are still taken."),
    JobAction.RESUME: Action(frozenset({JobState.PAUSED}), JobState.RUNNING, "Hand out leases again."),
    JobAction.ABORT: Action(frozenset({JobState.CREATED, JobState.RUNNING, JobState.PAUSED}), JobState.ABORTED,
                            "End the job without saving a model."),
    JobAction.ADVANCE: Action(TAKES_UPLOADS, None, "Step a complete round (jobs with auto_advance off)."),
    JobAction.FINALIZE: Action(TAKES_UPLOADS, JobState.FINALIZED,
                               "Save the model of the last completed round and end the job."),
}
