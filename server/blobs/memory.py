"""Blobs in a dict: the second implementation of the seam, for fast tests of everything above it."""

from __future__ import annotations

import io
import threading
from typing import BinaryIO

from .base import BlobStore, BlobWriter, Faults, check_key


class _Buffer(io.BytesIO):
    """A BytesIO whose writes pass the fault check first."""

    def __init__(self, faults: Faults, key: str):
        super().__init__()
        self._faults, self.name = faults, key

    def write(self, data) -> int:
        self._faults.check("write", self.name)
        return super().write(data)


class MemoryWriter(BlobWriter):
    def __init__(self, store: MemoryBlobStore, key: str, durable: bool):
        super().__init__(key, durable, store.faults)
        self.store = store
        self.file = _Buffer(store.faults, key)

    def _publish(self) -> None:
        with self.store.lock:
            self.store.blobs[self.key] = self.file.getvalue()

    def _discard(self) -> None:
        self.file.close()


class MemoryBlobStore(BlobStore):
    def __init__(self, faults: Faults | None = None, capacity: int | None = None):
        self.faults = faults or Faults()
        self.capacity = capacity  # bytes the store may hold in all (None: unlimited), for tests of a full disk
        self.lock = threading.Lock()
        self.blobs: dict[str, bytes] = {}

    def create(self, key: str, *, private: bool = True, durable: bool = True) -> MemoryWriter:
        return MemoryWriter(self, check_key(key), durable)

    def open(self, key: str) -> BinaryIO:
        with self.lock:
            data = self.blobs.get(check_key(key))
        if data is None:
            raise FileNotFoundError(f"no blob {key!r}")
        stream = io.BytesIO(data)
        stream.name = key
        return stream

    def exists(self, key: str) -> bool:
        with self.lock:
            return check_key(key) in self.blobs

    def size(self, key: str) -> int:
        with self.lock:
            if check_key(key) not in self.blobs:
                raise FileNotFoundError(f"no blob {key!r}")
            return len(self.blobs[key])

    def list(self, folder: str) -> list[str]:
        prefix = check_key(folder) + "/"
        with self.lock:
            return sorted(k[len(prefix):] for k in self.blobs if k.startswith(prefix) and "/" not in k[len(prefix):])

    def delete(self, key: str) -> None:
        self.faults.check("delete", key)
        with self.lock:
            self.blobs.pop(check_key(key), None)

    def delete_folder(self, folder: str) -> None:
        self.faults.check("delete", folder)
        prefix = check_key(folder) + "/"
        with self.lock:
            for key in [k for k in self.blobs if k.startswith(prefix)]:
                del self.blobs[key]

    def describe(self, key: str) -> str:
        return f"memory:{check_key(key)}"

    def free_bytes(self) -> int | None:
        if self.capacity is None:
            return None
        with self.lock:
            return max(0, self.capacity - sum(map(len, self.blobs.values())))

    def drop_partial_writes(self) -> int:
        return 0  # a writer's buffer dies with the process
