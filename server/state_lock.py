"""One server per state folder: an exclusive `flock` on `<state_dir>/server.lock` for the server's life.

Two servers on one folder would each delete the other's in-flight uploads at start-up and merge
into the same rounds through two job locks, losing updates. The lock is taken before the store
is opened or anything is deleted, and held by the process that owns the store and the blobs; the
kernel drops it when that process ends, however it ends (SIGKILL included), so a crash never
leaves a stale lock behind. The file holds the holder's pid, for the message the next one reads.

This is a lock on an open file, not a blob: it lives beside the blob store, never through it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pum.common.errors import Conflict

LOCK_NAME = "server.lock"


class StateLock:
    """Held from `acquire` until `release` or the process's end."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        """Take the lock without waiting; Conflict naming the holder's pid when it is taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise Conflict(
                f"state folder {self.path.parent.resolve()} is in use by another pum server (pid {holder}); "
                "stop it, or give this one its own --state-dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock (the file stays: deleting it would race a server taking it at that moment)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
