"""The job service: the server's operations, by concern, over one store and the blob stores.

    service.jobs      lifecycle: create, the admin actions, stepping rounds, the export  (lifecycle.py)
    service.work      the work protocol: leases, heartbeats, give-backs, downloads       (work.py)
    service.uploads   receiving deltas and merging them exactly once                      (uploads.py)
    service.context   what they share: store, blobs, settings, the job locks              (context.py)
    service.status(), .privacy(), .model_files(), .model_file(): what the admin reads     (views.py)

Routes call one method each; errors are `pum.common.errors` exceptions that the edge maps to
status codes. Building the service recovers from a crash (recovery.py) before it serves.
"""

from __future__ import annotations

import logging

from typing import Iterator

from pum.common.errors import PumError
from pum.common.schemas import JobStatus, ModelFiles, PrivacyReport, Revoked

from . import views
from .blobs import BlobStore, LocalBlobStore
from .config import ServerSettings
from .context import ServerContext
from .lifecycle import Lifecycle
from .metrics import Metrics, StoreCollector, headline_epsilon
from .recovery import recover, remove_orphans
from .state_lock import StateLock
from .store import SqliteStore, Store
from .tokens import issue_token, revoke_tokens
from .uploads import Uploads
from .work import WorkProtocol

log = logging.getLogger(__name__)


class JobService:
    def __init__(self, store: Store, settings: ServerSettings, blobs: BlobStore | None = None,
                 saves: BlobStore | None = None, metrics: Metrics | None = None,
                 state_lock: StateLock | None = None):
        """`blobs` holds the state folder's files and `saves` the merged models (default: local
        folders settings.state_dir and settings.saves_dir); `metrics` the server's own (default: new);
        `state_lock`, held, is released by `close`."""
        self._state_lock = state_lock
        self.context = ServerContext(
            store, blobs or LocalBlobStore(settings.state_dir), saves or LocalBlobStore(settings.saves_dir), settings,
            metrics or Metrics(),
        )
        self.context.metrics.attach(StoreCollector(store, self._epsilon))
        self._epsilons: dict[str, tuple] = {}  # job → (report inputs, ε): /metrics reads it at each scrape
        self.jobs = Lifecycle(self.context)
        self.work = WorkProtocol(self.context, on_given_back=self.jobs.copy_given_back)
        self.uploads = Uploads(self.context, self.work, self.jobs)
        dropped = self.context.blobs.drop_partial_writes()
        if dropped:
            log.info("dropped %d blob writes a crash interrupted", dropped)
        remove_orphans(self.context)
        recover(self.context, self.jobs)

    @classmethod
    def open(cls, settings: ServerSettings) -> JobService:
        """The service over settings.state_dir: SQLite state and local blobs (the embedded defaults).

        The state folder's lock is taken first, before anything is opened or deleted: Conflict,
        naming the holder's pid, when another server runs on it."""
        lock = StateLock(settings.state_dir).acquire()
        try:
            return cls(SqliteStore(settings.state_dir / "state.db"), settings, state_lock=lock)
        except BaseException:
            lock.release()
            raise

    @property
    def store(self) -> Store:
        return self.context.store

    @property
    def settings(self) -> ServerSettings:
        return self.context.settings

    def status(self, job_id: str) -> JobStatus:
        return views.job_status(self.context, job_id)

    def privacy(self, job_id: str) -> PrivacyReport:
        return views.privacy(self.context, job_id)

    def _epsilon(self, job_id: str) -> float | None:
        """The headline ε of /metrics, computed again only when what the report depends on changed; None
        for a job without one, or whose files are gone (the scrape still answers)."""
        try:
            job = self.context.job(job_id)
            inputs = (job.state, len(self.store.rounds(job_id)), self.store.largest_party_leases(job_id),
                      tuple(sorted(self.store.token_parties(job_id).items())))
            cached = self._epsilons.get(job_id)
            if cached is None or cached[0] != inputs:
                cached = self._epsilons[job_id] = (inputs, headline_epsilon(self.privacy(job_id)))
            return cached[1]
        except (PumError, OSError):
            return None

    @property
    def metrics(self) -> Metrics:
        return self.context.metrics

    def model_files(self, job_id: str) -> ModelFiles:
        return views.model_files(self.context, job_id)

    def model_file(self, job_id: str, name: str) -> tuple[int, Iterator[bytes]]:
        return views.model_file(self.context, job_id, name)

    def issue_token(self, job_id: str, label: str, party: str = "") -> str:
        return issue_token(self.context, job_id, label, party)

    def revoke_tokens(self, job_id: str, label: str) -> Revoked:
        """Revoke the job's tokens of this label, end their leases and the downloads of those leases."""
        revoked = revoke_tokens(self.context, job_id, label)
        self.work.streams.cut(revoked.leases)
        return revoked

    def close(self) -> None:
        self.uploads.close()
        self.work.streams.close()
        self.context.store.close()
        if self._state_lock is not None:
            self._state_lock.release()
