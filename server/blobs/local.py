"""Blobs as files under a folder on the local disk (the embedded default).

A write goes to a hidden temporary file next to its target, created 0600 for private blobs; on
commit the file is flushed and fsynced, renamed over the target, and the folder is fsynced so the
rename itself survives a power loss. Folders created on the way are synced into their parents.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO

from .base import BlobStore, BlobWriter, Faults, check_key


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _CheckedFile:
    """A file whose writes pass the fault check first (the rest is the file's own)."""

    def __init__(self, file: BinaryIO, faults: Faults, key: str):
        self._file, self._faults, self._key = file, faults, key
        self.name = key

    def write(self, data) -> int:
        self._faults.check("write", self._key)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)


class LocalWriter(BlobWriter):
    def __init__(self, store: LocalBlobStore, key: str, private: bool, durable: bool):
        super().__init__(key, durable, store.faults)
        self.target = store.path(key)
        store.make_folder(self.target.parent, durable)
        self.temporary = self.target.with_name(f".{self.target.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
        self._raw = os.fdopen(fd, "wb")
        self.file = _CheckedFile(self._raw, store.faults, key)

    def _flush(self) -> None:
        self._raw.flush()

    def _sync(self) -> None:
        os.fsync(self._raw.fileno())

    def _publish(self) -> None:
        self._raw.close()
        os.replace(self.temporary, self.target)

    def _sync_folder(self) -> None:
        fsync_folder(self.target.parent)

    def _discard(self) -> None:
        self._raw.close()
        self.temporary.unlink(missing_ok=True)


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path, faults: Faults | None = None):
        self.root = root
        self.faults = faults or Faults()  # created with the first blob

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def make_folder(self, folder: Path, durable: bool) -> None:
        """Create `folder` and its missing parents; each new one is synced into its parent."""
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for new in reversed(missing):
            new.mkdir(exist_ok=True)
            if durable:
                fsync_folder(new.parent)

    def create(self, key: str, *, private: bool = True, durable: bool = True) -> LocalWriter:
        return LocalWriter(self, key, private, durable)

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb", buffering=0)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def list(self, folder: str) -> list[str]:
        path = self.path(folder)
        if not path.is_dir():
            return []
        return sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))

    def delete(self, key: str) -> None:
        self.faults.check("delete", key)
        self.path(key).unlink(missing_ok=True)

    def delete_folder(self, folder: str) -> None:
        self.faults.check("delete", folder)
        shutil.rmtree(self.path(folder), ignore_errors=True)

    def describe(self, key: str) -> str:
        return str(self.path(key).resolve())

    def free_bytes(self) -> int | None:
        folder = self.root
        while not folder.is_dir():  # before the first blob: the disk the folder will be made on
            folder = folder.parent
        return shutil.disk_usage(folder).free

    def drop_partial_writes(self) -> int:
        stale = list(self.root.rglob(".*.tmp")) if self.root.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)
