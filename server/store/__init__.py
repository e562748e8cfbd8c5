"""The store seam: the `Store` protocol, its records, and its two implementations."""

from .base import Store
from .memory import MemoryStore
from .records import Copy, Job, JobSpec, Lease, Round
from .sqlite import SqliteStore

__all__ = ["Copy", "Job", "JobSpec", "Lease", "MemoryStore", "Round", "SqliteStore", "Store"]
