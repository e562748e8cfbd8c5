"""Durable server state in SQLite: jobs, worker tokens, rounds, copies and leases.

Every public method is one transaction. The copy table is the source of truth for exactly-once
merging: a copy moves pending → leased → accepted, and `accept_copy` commits the new S0 and the
new S1 file name together with the copy's state, so a crash leaves either the old or the new
round state, never half of one.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from pum.common.errors import LeaseExpired

# Columns added after the first release, with their definitions: an older state.db gets them on open.
ADDED_COLUMNS = {"tokens": {"party": "TEXT NOT NULL DEFAULT ''"}, "rounds": {"taus": "TEXT NOT NULL DEFAULT '{}'"}}

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
"""


@dataclass(frozen=True)
class Job:
    id: str
    task: str
    state: str
    round: int
    spec: dict[str, Any]
    created_at: float
    updated_at: float
    error: str | None
    output_dir: str | None


@dataclass(frozen=True)
class Round:
    job_id: str
    round: int
    state: str
    s0: float
    accepted: int
    s1_file: str | None
    sigmas: dict[str, float]
    started_at: float
    finished_at: float | None
    taus: dict[str, float]  # jitter τ_ℓ per layer group ({} in a round stored before τ_ℓ was kept)


@dataclass(frozen=True)
class Lease:
    id: str
    job_id: str
    round: int
    k: int
    token_hash: str
    state: str
    created_at: float
    expires_at: float


class Store:
    """SQLite store; thread-safe through one lock around one connection."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # private before the first byte: SQLite creates the -wal and -shm files with the database's mode
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        path.chmod(0o600)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
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
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # jobs
    def insert_job(self, job_id: str, task: str, spec: dict) -> None:
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, 'created', 0, ?, ?, ?, NULL, NULL)",
                (job_id, task, json.dumps(spec), now, now),
            )

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at").fetchall()
        return [_job(r) for r in rows]

    def update_job(self, job_id: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    # tokens
    def insert_token(self, token_hash: str, job_id: str, label: str, party: str = "") -> None:
        """`party`: the data owner the token belongs to ("" = the job's one data owner)."""
        with self.transaction() as db:
            db.execute("INSERT INTO tokens (hash, job_id, label, created_at, party) VALUES (?, ?, ?, ?, ?)",
                       (token_hash, job_id, label, time.time(), party))

    def token_parties(self, job_id: str) -> dict[str, int]:
        """Party → number of the job's tokens in it."""
        with self._lock:
            rows = self._db.execute("SELECT party, COUNT(*) AS n FROM tokens WHERE job_id = ? GROUP BY party",
                                    (job_id,)).fetchall()
        return {r["party"]: r["n"] for r in rows}

    def token_job(self, token_hash: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT job_id FROM tokens WHERE hash = ?", (token_hash,)).fetchone()
        return row["job_id"] if row else None

    def token_labels(self, job_id: str) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute("SELECT hash, label FROM tokens WHERE job_id = ?", (job_id,)).fetchall()
        return {r["hash"]: r["label"] for r in rows}

    # rounds and copies
    def open_round(self, job_id: str, round_: int, m: int, sigmas: dict[str, float], taus: dict[str, float]) -> None:
        """Insert round `round_` with m pending copies and make it the job's current round."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO rounds (job_id, round, state, s0, accepted, s1_file, sigmas, started_at, finished_at, taus) "
                "VALUES (?, ?, 'open', 0.0, 0, NULL, ?, ?, NULL, ?)",
                (job_id, round_, json.dumps(sigmas), now, json.dumps(taus)),
            )
            db.executemany(
                "INSERT INTO copies (job_id, round, k, state) VALUES (?, ?, ?, 'pending')",
                [(job_id, round_, k) for k in range(m)],
            )
            db.execute("UPDATE jobs SET round = ?, updated_at = ? WHERE id = ?", (round_, now, job_id))

    def round(self, job_id: str, round_: int) -> Round | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM rounds WHERE job_id = ? AND round = ?", (job_id, round_)
            ).fetchone()
        return _round(row) if row else None

    def rounds(self, job_id: str) -> list[Round]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM rounds WHERE job_id = ? ORDER BY round", (job_id,)).fetchall()
        return [_round(r) for r in rows]

    def finish_round(self, job_id: str, round_: int) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE rounds SET state = 'merged', finished_at = ? WHERE job_id = ? AND round = ?",
                (time.time(), job_id, round_),
            )

    def copies(self, job_id: str, round_: int) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM copies WHERE job_id = ? AND round = ? ORDER BY k", (job_id, round_)
            ).fetchall()
        return [dict(r) for r in rows]

    # leases
    def largest_party_leases(self, job_id: str) -> int | None:
        """The most distinct copies of one round that the tokens of one party were leased (None: no lease yet)."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(n) FROM (SELECT COUNT(DISTINCT l.k) AS n FROM leases l JOIN tokens t ON t.hash = l.token_hash "
                "WHERE l.job_id = ? GROUP BY l.round, t.party)", (job_id,),
            ).fetchone()
        return row[0]

    def expire_leases(self, now: float) -> list[Lease]:
        """Mark active leases past their expiry as expired and put their copies back; returns them."""
        with self.transaction() as db:
            rows = db.execute("SELECT * FROM leases WHERE state = 'active' AND expires_at < ?", (now,)).fetchall()
            for row in rows:
                db.execute("UPDATE leases SET state = 'expired' WHERE id = ?", (row["id"],))
                db.execute(
                    "UPDATE copies SET state = 'pending', lease_id = NULL "
                    "WHERE job_id = ? AND round = ? AND k = ? AND lease_id = ?",
                    (row["job_id"], row["round"], row["k"], row["id"]),
                )
        return [_lease(r) for r in rows]

    def grant_lease(
        self, lease_id: str, job_id: str, round_: int, token_hash: str, clock: Callable[[], float], ttl: float,
        cap: int | None,
    ) -> Lease | None:
        """Lease a uniformly random pending copy of the round (drawn with `secrets`: the order of
        the leases says nothing about the copy index k) to `token_hash`, or None if none is free.

        `cap` limits how many distinct copies of one round a token may ever receive. The clock is
        read inside the transaction, so a lease granted after waiting for the lock gets its full TTL.
        """
        with self.transaction() as db:
            now = clock()
            if cap is not None:
                held = db.execute(
                    "SELECT COUNT(DISTINCT k) FROM leases WHERE job_id = ? AND round = ? AND token_hash = ?",
                    (job_id, round_, token_hash),
                ).fetchone()[0]
                if held >= cap:
                    return None
            pending = [r["k"] for r in db.execute(
                "SELECT k FROM copies WHERE job_id = ? AND round = ? AND state = 'pending'", (job_id, round_),
            )]
            if not pending:
                return None
            k = secrets.choice(pending)
            db.execute(
                "UPDATE copies SET state = 'leased', lease_id = ?, leases = leases + 1, leased_at = ? "
                "WHERE job_id = ? AND round = ? AND k = ?",
                (lease_id, now, job_id, round_, k),
            )
            db.execute(
                "INSERT INTO leases VALUES (?, ?, ?, ?, ?, 'active', ?, ?)",
                (lease_id, job_id, round_, k, token_hash, now, now + ttl),
            )
        return Lease(lease_id, job_id, round_, k, token_hash, "active", now, now + ttl)

    def lease(self, lease_id: str) -> Lease | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
        return _lease(row) if row else None

    def extend_lease(self, lease_id: str, expires_at: float) -> bool:
        """Push an active lease's expiry; False when it is no longer active (nothing changed)."""
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE leases SET expires_at = ? WHERE id = ? AND state = 'active'", (expires_at, lease_id)
            ).rowcount
        return changed == 1

    def release_lease(self, lease_id: str, failed: bool) -> None:
        """End an active lease early and put its copy back (a worker gave up or reported failure)."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM leases WHERE id = ? AND state = 'active'", (lease_id,)).fetchone()
            if row is None:
                return
            db.execute("UPDATE leases SET state = ? WHERE id = ?", ("failed" if failed else "released", lease_id))
            db.execute(
                "UPDATE copies SET state = 'pending', lease_id = NULL, failures = failures + ? "
                "WHERE job_id = ? AND round = ? AND k = ? AND lease_id = ?",
                (int(failed), row["job_id"], row["round"], row["k"], lease_id),
            )

    def end_active_leases(self, job_id: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE leases SET state = 'cancelled' WHERE job_id = ? AND state = 'active'", (job_id,))

    def accept_copy(self, lease: Lease, s0: float, s1_file: str, now: float) -> None:
        """Commit one merged copy: the copy, its lease, S0 and the S1 file change together."""
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE copies SET state = 'accepted', accepted_at = ? "
                "WHERE job_id = ? AND round = ? AND k = ? AND lease_id = ? AND state = 'leased'",
                (now, lease.job_id, lease.round, lease.k, lease.id),
            ).rowcount
            if changed != 1:
                raise LeaseExpired(f"lease {lease.id} expired while its delta was merged: ask for a new lease")
            db.execute("UPDATE leases SET state = 'done' WHERE id = ?", (lease.id,))
            db.execute(
                "UPDATE rounds SET s0 = ?, s1_file = ?, accepted = accepted + 1 WHERE job_id = ? AND round = ?",
                (s0, s1_file, lease.job_id, lease.round),
            )


def _job(row: sqlite3.Row) -> Job:
    return Job(**{**dict(row), "spec": json.loads(row["spec"])})


def _round(row: sqlite3.Row) -> Round:
    return Round(**{**dict(row), "sigmas": json.loads(row["sigmas"]), "taus": json.loads(row["taus"])})


def _lease(row: sqlite3.Row) -> Lease:
    return Lease(**dict(row))
