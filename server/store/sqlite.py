"""The SQLite store (the embedded default): one connection in WAL mode.

Each public method is one `BEGIN IMMEDIATE … COMMIT` transaction, or one read; a lock serialises
them on the one connection. Every state column is written with a `WHERE state IN (…)` built from
the transition tables, so a write the table does not allow matches no row.

Durability: what the round depends on (jobs, rounds, accepted copies) is on disk when the call
returns: the transaction commits, the lock is released, then the write-ahead log is fsynced —
what synchronous=FULL does, but without holding the lock through the fsync, so a lease request
never waits for the disk behind another call's commit. Lease bookkeeping (grant, renewal, expiry,
give-back) is not synced at all: a power loss may undo the last of these, which only sends a
worker back for a new lease. The log is written in order, so a sync covers every earlier commit:
a copy's acceptance is never on disk without the grant of its lease.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pum.common.states import (
    COPY_TRANSITIONS, END_STATES, JOB_TRANSITIONS, LEASE_TRANSITIONS, ROUND_TRANSITIONS, CopyState, JobState,
    LeaseState, RoundState, sources,
)

from .base import copy_not_held, no_job, not_ended, task_taken, transition_refused
from .records import Copy, Job, JobSpec, Lease, Round

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, state TEXT NOT NULL, round INTEGER NOT NULL,
    spec TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    error TEXT, output_dir TEXT
);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, job_id TEXT NOT NULL, label TEXT NOT NULL, created_at REAL NOT NULL,
    party TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL,
    s0 REAL NOT NULL, accepted INTEGER NOT NULL, s1_file TEXT, sigmas TEXT NOT NULL,
    started_at REAL NOT NULL, finished_at REAL, taus TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS copies (
    job_id TEXT NOT NULL, round INTEGER NOT NULL, k INTEGER NOT NULL, state TEXT NOT NULL,
    lease_id TEXT, leases INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
    leased_at REAL, accepted_at REAL, PRIMARY KEY (job_id, round, k)
);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, round INTEGER NOT NULL, k INTEGER NOT NULL,
    token_hash TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_state ON leases (state, expires_at);
CREATE INDEX IF NOT EXISTS leases_by_job ON leases (job_id, round, token_hash);
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task);
"""
# Columns added after the first release, with their definitions: an older state.db gets them on open.
ADDED_COLUMNS = {"tokens": {"party": "TEXT NOT NULL DEFAULT ''", "revoked_at": "REAL"},
                 "rounds": {"taus": "TEXT NOT NULL DEFAULT '{}'"}, "leases": {"reason": "TEXT NOT NULL DEFAULT ''"},
                 "copies": {"update_sums": "TEXT"}}


def _states(table: dict, target) -> str:
    """`state IN ('a', 'b')`: the states `target` may be reached from (enum values are plain words)."""
    return "state IN (" + ", ".join(f"'{s.value}'" for s in sorted(sources(table, target))) + ")"


class SqliteStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time):
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        # private before the first byte: SQLite creates the -wal and -shm files with the database's mode
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        path.chmod(0o600)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # the durable commits sync the log themselves
        self._path, self._wal = path, path.with_name(path.name + "-wal")
        self._db.executescript(SCHEMA)
        for table, columns in ADDED_COLUMNS.items():
            have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, definition in columns.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
        for companion in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if companion.exists():  # made by an older version, or under another umask
                companion.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any exception; on disk at exit when `durable`."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        if durable:
            self._sync_log()

    def _sync_log(self) -> None:
        """fsync the write-ahead log: every transaction committed so far is on disk. (A checkpoint
        copies the log into the database and syncs both itself; when no log file exists, the
        database file holds everything.)"""
        for path in (self._wal, self._path):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    # ---- jobs ------------------------------------------------------------------------------
    def insert_job(self, job_id: str, task: str, spec: JobSpec) -> Job:
        with self._transaction() as db:
            owner = db.execute("SELECT id FROM jobs WHERE task = ? LIMIT 1", (task,)).fetchone()
            if owner is not None:
                raise task_taken(task, owner["id"])
            now = self.clock()
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, 0, ?, ?, ?, NULL, NULL)",
                (job_id, task, JobState.CREATED.value, spec.model_dump_json(), now, now),
            )
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def job(self, job_id: str) -> Job | None:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self) -> list[Job]:
        return [_job(r) for r in self._rows("SELECT * FROM jobs ORDER BY created_at, rowid")]

    def delete_job(self, job_id: str) -> Job:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise no_job(job_id)
            job = _job(row)
            if job.state not in END_STATES:
                raise not_ended(job)
            for table in ("leases", "copies", "rounds", "tokens", "jobs"):
                db.execute(f"DELETE FROM {table} WHERE {'id' if table == 'jobs' else 'job_id'} = ?", (job_id,))
            return job

    def set_job_state(self, job_id: str, target: JobState, *, error: str | None = None,
                      output_dir: str | None = None) -> Job:
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, error = COALESCE(?, error), "
                f"output_dir = COALESCE(?, output_dir) WHERE id = ? AND {_states(JOB_TRANSITIONS, target)}",
                (target.value, self.clock(), error, output_dir, job_id),
            ).rowcount
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if not changed:
                raise transition_refused(_job(row) if row else None, job_id, target)
            if target in END_STATES:
                self._end_live_leases(db, job_id)
            return _job(row)

    def _end_live_leases(self, db: sqlite3.Connection, job_id: str) -> None:
        db.execute(
            f"UPDATE copies SET state = ?, lease_id = NULL WHERE job_id = ? AND {_states(COPY_TRANSITIONS, CopyState.PENDING)} "
            "AND lease_id IN (SELECT id FROM leases WHERE job_id = ? AND state = ?)",
            (CopyState.PENDING.value, job_id, job_id, LeaseState.ACTIVE.value),
        )
        db.execute(
            f"UPDATE leases SET state = ? WHERE job_id = ? AND {_states(LEASE_TRANSITIONS, LeaseState.CANCELLED)}",
            (LeaseState.CANCELLED.value, job_id),
        )

    # ---- tokens ----------------------------------------------------------------------------
    def insert_token(self, token_hash: str, job_id: str, label: str, party: str = "") -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO tokens (hash, job_id, label, created_at, party) VALUES (?, ?, ?, ?, ?)",
                       (token_hash, job_id, label, self.clock(), party))

    def token_parties(self, job_id: str) -> dict[str, int]:
        rows = self._rows("SELECT party, COUNT(*) AS n FROM tokens WHERE job_id = ? GROUP BY party", (job_id,))
        return {r["party"]: r["n"] for r in rows}

    def token_labels(self, job_id: str) -> dict[str, str]:
        return {r["hash"]: r["label"] for r in self._rows("SELECT hash, label FROM tokens WHERE job_id = ?", (job_id,))}

    def token_job(self, token_hash: str) -> str | None:
        rows = self._rows("SELECT job_id FROM tokens WHERE hash = ? AND revoked_at IS NULL", (token_hash,))
        return rows[0]["job_id"] if rows else None

    def revoke_tokens(self, job_id: str, label: str) -> tuple[int, list[Lease]]:
        with self._transaction() as db:
            hashes = [r["hash"] for r in db.execute(
                "SELECT hash FROM tokens WHERE job_id = ? AND label = ? AND revoked_at IS NULL", (job_id, label))]
            db.executemany("UPDATE tokens SET revoked_at = ? WHERE hash = ?", [(self.clock(), h) for h in hashes])
            ended = []
            for h in hashes:
                for row in db.execute("SELECT * FROM leases WHERE token_hash = ? AND state = ?",
                                      (h, LeaseState.ACTIVE.value)).fetchall():
                    if self._end_lease(db, _lease(row), LeaseState.REVOKED, failed=False):
                        ended.append(_lease(db.execute("SELECT * FROM leases WHERE id = ?", (row["id"],)).fetchone()))
        return len(hashes), ended

    # ---- rounds and copies -------------------------------------------------------------------
    def open_round(self, job_id: str, round_: int, m: int, sigmas: dict[str, float], taus: dict[str, float]) -> Round:
        with self._transaction() as db:
            now = self.clock()
            db.execute(
                "INSERT INTO rounds (job_id, round, state, s0, accepted, s1_file, sigmas, started_at, finished_at, taus) "
                "VALUES (?, ?, ?, 0.0, 0, NULL, ?, ?, NULL, ?)",
                (job_id, round_, RoundState.OPEN.value, json.dumps(sigmas), now, json.dumps(taus)),
            )
            db.executemany(
                "INSERT INTO copies (job_id, round, k, state) VALUES (?, ?, ?, ?)",
                [(job_id, round_, k, CopyState.PENDING.value) for k in range(m)],
            )
            db.execute("UPDATE jobs SET round = ?, updated_at = ? WHERE id = ?", (round_, now, job_id))
            return _round(db.execute("SELECT * FROM rounds WHERE job_id = ? AND round = ?", (job_id, round_)).fetchone())

    def round(self, job_id: str, round_: int) -> Round | None:
        rows = self._rows("SELECT * FROM rounds WHERE job_id = ? AND round = ?", (job_id, round_))
        return _round(rows[0]) if rows else None

    def rounds(self, job_id: str) -> list[Round]:
        return [_round(r) for r in self._rows("SELECT * FROM rounds WHERE job_id = ? ORDER BY round", (job_id,))]

    def finish_round(self, job_id: str, round_: int) -> None:
        with self._transaction() as db:
            db.execute(
                f"UPDATE rounds SET state = ?, finished_at = ? WHERE job_id = ? AND round = ? "
                f"AND {_states(ROUND_TRANSITIONS, RoundState.MERGED)}",
                (RoundState.MERGED.value, self.clock(), job_id, round_),
            )

    def copies(self, job_id: str, round_: int) -> list[Copy]:
        rows = self._rows("SELECT * FROM copies WHERE job_id = ? AND round = ? ORDER BY k", (job_id, round_))
        return [Copy(**{**dict(r), "state": CopyState(r["state"]),
                        "update_sums": json.loads(r["update_sums"]) if r["update_sums"] is not None else None})
                for r in rows]

    # ---- leases ------------------------------------------------------------------------------
    def grant_lease(self, lease_id: str, job_id: str, round_: int, token_hash: str, ttl_s: float,
                    cap: int | None) -> Lease | None:
        with self._transaction(durable=False) as db:
            now = self.clock()  # read inside: a lease granted after waiting for the lock gets its full TTL
            job = db.execute("SELECT state, round FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if job is None or job["state"] != JobState.RUNNING.value or job["round"] != round_:
                return None
            if cap is not None:
                held = db.execute(
                    "SELECT COUNT(DISTINCT k) FROM leases WHERE job_id = ? AND round = ? AND token_hash = ?",
                    (job_id, round_, token_hash),
                ).fetchone()[0]
                if held >= cap:
                    return None
            pending = [r["k"] for r in db.execute(
                "SELECT k FROM copies WHERE job_id = ? AND round = ? AND state = ?", (job_id, round_, CopyState.PENDING.value),
            )]
            if not pending:
                return None
            k = secrets.choice(pending)
            db.execute(
                "UPDATE copies SET state = ?, lease_id = ?, leases = leases + 1, leased_at = ? "
                f"WHERE job_id = ? AND round = ? AND k = ? AND {_states(COPY_TRANSITIONS, CopyState.LEASED)}",
                (CopyState.LEASED.value, lease_id, now, job_id, round_, k),
            )
            lease = Lease(lease_id, job_id, round_, k, token_hash, LeaseState.ACTIVE, now, now + ttl_s)
            db.execute("INSERT INTO leases (id, job_id, round, k, token_hash, state, created_at, expires_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (lease.id, job_id, round_, lease.k, token_hash, lease.state.value, now, lease.expires_at))
        return lease

    def lease(self, lease_id: str) -> Lease | None:
        rows = self._rows("SELECT * FROM leases WHERE id = ?", (lease_id,))
        return _lease(rows[0]) if rows else None

    def leases(self, job_id: str) -> list[Lease]:
        return [_lease(r) for r in self._rows("SELECT * FROM leases WHERE job_id = ? ORDER BY rowid", (job_id,))]

    def expire_leases(self) -> list[Lease]:
        with self._transaction(durable=False) as db:
            rows = db.execute("SELECT * FROM leases WHERE state = ? AND expires_at < ?",
                              (LeaseState.ACTIVE.value, self.clock())).fetchall()
            for row in rows:
                self._end_lease(db, _lease(row), LeaseState.EXPIRED, failed=False)
        return [_lease(r) for r in rows]

    def _end_lease(self, db: sqlite3.Connection, lease: Lease, target: LeaseState, failed: bool) -> bool:
        changed = db.execute(
            f"UPDATE leases SET state = ? WHERE id = ? AND {_states(LEASE_TRANSITIONS, target)}",
            (target.value, lease.id),
        ).rowcount
        if changed:
            db.execute(
                "UPDATE copies SET state = ?, lease_id = NULL, failures = failures + ? "
                f"WHERE job_id = ? AND round = ? AND k = ? AND lease_id = ? AND {_states(COPY_TRANSITIONS, CopyState.PENDING)}",
                (CopyState.PENDING.value, int(failed), lease.job_id, lease.round, lease.k, lease.id),
            )
        return bool(changed)

    def extend_lease(self, lease_id: str, ttl_s: float) -> bool:
        with self._transaction(durable=False) as db:
            changed = db.execute(
                "UPDATE leases SET expires_at = ? WHERE id = ? AND state = ?",
                (self.clock() + ttl_s, lease_id, LeaseState.ACTIVE.value),
            ).rowcount
        return changed == 1

    def release_lease(self, lease_id: str, failed: bool, reason: str = "") -> Lease | None:
        with self._transaction(durable=False) as db:
            row = db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            target = LeaseState.FAILED if failed else LeaseState.RELEASED
            if row is None or not self._end_lease(db, _lease(row), target, failed):
                return None
            db.execute("UPDATE leases SET reason = ? WHERE id = ?", (reason, lease_id))
            return _lease(db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone())

    def revoke_lease(self, lease_id: str) -> Lease | None:
        with self._transaction(durable=False) as db:
            row = db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if row is None or not self._end_lease(db, _lease(row), LeaseState.REVOKED, failed=False):
                return None
            return _lease(db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone())

    def accept_copy(self, lease: Lease, s0: float, s1_file: str, update_sums: dict[str, float] | None = None) -> None:
        sums = json.dumps(update_sums) if update_sums is not None else None
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE copies SET state = ?, accepted_at = ?, update_sums = ? "
                f"WHERE job_id = ? AND round = ? AND k = ? AND lease_id = ? AND {_states(COPY_TRANSITIONS, CopyState.ACCEPTED)}",
                (CopyState.ACCEPTED.value, self.clock(), sums, lease.job_id, lease.round, lease.k, lease.id),
            ).rowcount
            changed &= db.execute(
                f"UPDATE leases SET state = ? WHERE id = ? AND {_states(LEASE_TRANSITIONS, LeaseState.DONE)}",
                (LeaseState.DONE.value, lease.id),
            ).rowcount
            if changed != 1:
                raise copy_not_held(lease)
            db.execute(
                "UPDATE rounds SET s0 = ?, s1_file = ?, accepted = accepted + 1 WHERE job_id = ? AND round = ?",
                (s0, s1_file, lease.job_id, lease.round),
            )

    def largest_party_leases(self, job_id: str) -> int | None:
        rows = self._rows(
            "SELECT MAX(n) FROM (SELECT COUNT(DISTINCT l.k) AS n FROM leases l JOIN tokens t ON t.hash = l.token_hash "
            "WHERE l.job_id = ? GROUP BY l.round, t.party)", (job_id,),
        )
        return rows[0][0]


def _job(row: sqlite3.Row) -> Job:
    return Job(**{**dict(row), "state": JobState(row["state"]), "spec": _spec(row["spec"])})


@functools.lru_cache(maxsize=256)
def _spec(text: str) -> JobSpec:
    """A stored spec, parsed once: specs never change, and parsing (with its settings) costs milliseconds."""
    return JobSpec.model_validate_json(text)


def _round(row: sqlite3.Row) -> Round:
    return Round(**{**dict(row), "state": RoundState(row["state"]), "sigmas": json.loads(row["sigmas"]),
                    "taus": json.loads(row["taus"])})


def _lease(row: sqlite3.Row) -> Lease:
    return Lease(**{**dict(row), "state": LeaseState(row["state"])})
