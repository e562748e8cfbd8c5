"""The blob store: every open, write, rename and delete of the server's files goes through it.

A blob is named by a key, a relative '/'-separated path ("jobs/job-1/theta_r1.safetensors").
Writes are atomic (readers see the old blob or the new one, never part of one) and, unless
`durable=False` (scratch data that crash recovery deletes anyway), durable: the data and the
directory entry are synced before `commit` returns, so a committed blob survives a power loss.

`Faults` lets tests make any primitive step fail (a write with ENOSPC, an fsync, a rename) in
every implementation alike; by default nothing is injected.
"""

from __future__ import annotations

import fnmatch
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pum.common.codec import SafetensorsFile, TensorInfo, stream_safetensors
from pum.common.errors import InsufficientStorage

CHUNK = 1 << 20
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,199}$")
OPERATIONS = ("write", "fsync", "rename", "fsync_dir", "delete")


def check_key(key: str) -> str:
    """A key of non-empty segments of safe characters: no '..', no absolute path, no hidden file."""
    parts = key.split("/")
    if not all(_SEGMENT.match(part) for part in parts):
        raise ValueError(f"blob key {key[:120]!r}: use '/'-separated names of letters, digits and '_.+=-'")
    return key


class Faults:
    """Armed failures, matched by operation and key pattern; each fires `times` times (None: always)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[list] = []
        self.fired: list[tuple[str, str]] = []

    def fail(self, operation: str, error: BaseException, key: str = "*", times: int | None = 1) -> None:
        if operation not in OPERATIONS:
            raise ValueError(f"operation {operation!r}: one of {OPERATIONS}")
        with self._lock:
            self._armed.append([operation, key, error, times])

    def check(self, operation: str, key: str) -> None:
        """Raise the armed error of (operation, key), if any."""
        with self._lock:
            for armed in self._armed:
                op, pattern, error, times = armed
                if op == operation and fnmatch.fnmatchcase(key, pattern) and (times is None or times > 0):
                    if times is not None:
                        armed[3] -= 1
                    self.fired.append((operation, key))
                    raise error


class BlobWriter(ABC):
    """A blob being written: fill `file`, then `commit` (atomic, durable) or `abort` (no trace).

    As a context manager it commits on success and aborts on an exception. `commit` is the same
    sequence in every backend — flush, sync the data, publish (the atomic rename), sync the
    folder — with the fault checks at the same points; a backend supplies the steps.
    """

    file: BinaryIO

    def __init__(self, key: str, durable: bool, faults: Faults):
        self.key, self.durable, self.faults = key, durable, faults
        self._done = False

    def _flush(self) -> None:
        """Everything written so far reaches the backend."""

    def _sync(self) -> None:
        """The data is on stable storage (durable writes only)."""

    @abstractmethod
    def _publish(self) -> None:
        """Atomically replace the blob with what was written."""

    def _sync_folder(self) -> None:
        """The blob's name is on stable storage (durable writes only)."""

    @abstractmethod
    def _discard(self) -> None:
        """Drop what was written (nothing was published)."""

    def commit(self) -> None:
        if self._done:
            return
        try:
            self._flush()
            if self.durable:
                self.faults.check("fsync", self.key)
                self._sync()
            self.faults.check("rename", self.key)
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._done = True
        if self.durable:  # a failure now is reported, but the blob holds the whole new content
            self.faults.check("fsync_dir", self.key)
            self._sync_folder()

    def abort(self) -> None:
        self._done = True
        self._discard()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class BlobStore(ABC):
    """Primitives each backend implements, and the helpers every caller uses on top of them."""

    @abstractmethod
    def create(self, key: str, *, private: bool = True, durable: bool = True) -> BlobWriter:
        """A writer that replaces the blob `key` when committed; private blobs are 0600 from the first byte."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """The blob for reading (seek, readinto); FileNotFoundError when there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def list(self, folder: str) -> list[str]:
        """Names of the blobs directly in `folder`, sorted (no sub-folders, no blobs being written)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a blob; nothing happens when there is none."""

    @abstractmethod
    def delete_folder(self, folder: str) -> None:
        """Remove every blob under `folder`."""

    @abstractmethod
    def describe(self, key: str) -> str:
        """Where the blob lives, for people (a path on the server's disk)."""

    @abstractmethod
    def drop_partial_writes(self) -> int:
        """Delete what writers left uncommitted when the process died; returns how many (start-up only)."""

    def free_bytes(self) -> int | None:
        """Bytes a new blob may still take (None: the backend does not know)."""
        return None

    # ---- helpers ---------------------------------------------------------------------------
    def check_space(self, needed: int, what: str) -> None:
        """InsufficientStorage, naming the bytes needed and available, when `needed` bytes do not fit."""
        free = self.free_bytes()
        if free is not None and needed > free:
            raise InsufficientStorage(f"{what} needs {needed} bytes of disk and the server has {free} free: "
                                      "free space on the server, then try again")

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def write_bytes(self, key: str, data: bytes, *, private: bool = True) -> None:
        with self.create(key, private=private) as writer:
            writer.file.write(data)

    def safetensors(self, key: str) -> SafetensorsFile:
        """The blob as a safetensors reader (close it, or use it as a context manager)."""
        return SafetensorsFile(self.open(key))

    def write_safetensors(self, key: str, infos: list[TensorInfo], tensors, metadata: dict[str, str] | None = None,
                          *, private: bool = True) -> None:
        """Stream tensors into the blob, one at a time (see `pum.common.codec.stream_safetensors`)."""
        with self.create(key, private=private) as writer:
            for chunk in stream_safetensors(infos, tensors, metadata):
                writer.file.write(chunk)

    def chunks(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        """The blob's bytes in chunks (opened at once: a missing blob fails here, not mid-stream)."""
        f = self.open(key)

        def read() -> Iterator[bytes]:
            with f:
                while data := f.read(chunk):
                    yield data

        return read()

    def copy(self, source: str, target: str, *, private: bool = True) -> None:
        with self.create(target, private=private) as writer, self.open(source) as f:
            while data := f.read(CHUNK):
                writer.file.write(data)

    def import_file(self, key: str, path: Path, *, private: bool = True) -> None:
        """Copy a file from outside the store (a model folder given by the admin) into it."""
        with self.create(key, private=private) as writer, path.open("rb") as f:
            while data := f.read(CHUNK):
                writer.file.write(data)
