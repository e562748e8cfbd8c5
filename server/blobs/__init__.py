"""The blob seam: `BlobStore` and its two implementations (local folder, memory)."""

from .base import BlobStore, BlobWriter, Faults, check_key
from .local import LocalBlobStore
from .memory import MemoryBlobStore

__all__ = ["BlobStore", "BlobWriter", "Faults", "LocalBlobStore", "MemoryBlobStore", "check_key"]
