"""What every part of the service shares: the store, the blob stores, the settings, the job locks."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from .blobs import BlobStore
from .config import ServerSettings
from .job_files import JobFiles
from .metrics import Metrics
from .store import Job, Store
from .store.base import no_job


@dataclass
class ServerContext:
    store: Store
    blobs: BlobStore  # the state folder: jobs' secrets, θ, rounds, spools
    saves: BlobStore  # merged models, one folder per task
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)  # this server's counters and histograms
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)

    @property
    def clock(self) -> Callable[[], float]:
        return self.store.clock

    def job(self, job_id: str) -> Job:
        job = self.store.job(job_id)
        if job is None:
            raise no_job(job_id)
        return job

    def files(self, job_id: str) -> JobFiles:
        return JobFiles(self.blobs, job_id)

    def key(self, job_id: str) -> bytes:
        """The job's secret key (α_k, seeds and z̄ derive from it)."""
        return self.files(job_id).read_key()

    def lock(self, job_id: str) -> threading.Lock:
        """The job's lock: held by every change of its state and by every merge into its rounds."""
        with self._locks_guard:
            return self._locks.setdefault(job_id, threading.Lock())

    def forget_lock(self, job_id: str) -> None:
        """Drop a deleted job's lock (a request still holding it keeps its own reference)."""
        with self._locks_guard:
            self._locks.pop(job_id, None)
