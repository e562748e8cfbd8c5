"""One suite for every `BlobStore`: local files (the server's default) and memory.

`Faults` makes a primitive step fail the same way in both, so the failure paths are part of the
suite: a write that hits ENOSPC, a failed fsync or rename leaves the previous blob whole and no
partial one anywhere.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from pum.common.codec import TensorInfo
from pum.server.blobs import BlobStore, Faults, LocalBlobStore, MemoryBlobStore

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class BlobConformance:
    def make(self, faults: Faults, folder: Path) -> BlobStore:
        raise NotImplementedError

    @pytest.fixture
    def faults(self) -> Faults:
        return Faults()

    @pytest.fixture
    def blobs(self, faults, tmp_path) -> BlobStore:
        return self.make(faults, tmp_path / "blobs")

    def test_a_written_blob_reads_back(self, blobs):
        blobs.write_bytes("jobs/j/secret.key", b"k" * 32)
        assert blobs.read_bytes("jobs/j/secret.key") == b"k" * 32
        assert blobs.exists("jobs/j/secret.key") and blobs.size("jobs/j/secret.key") == 32
        assert not blobs.exists("jobs/j/other")
        with pytest.raises(FileNotFoundError):
            blobs.open("jobs/j/other")

    def test_safetensors_stream_in_and_out(self, blobs):
        infos = [TensorInfo("a", "F32", (2, 3)), TensorInfo("b", "BF16", (4,))]
        tensors = [torch.arange(6.0).reshape(2, 3), torch.ones(4, dtype=torch.bfloat16)]
        blobs.write_safetensors("x/t.safetensors", infos, iter(tensors), {"v": "1"})
        with blobs.safetensors("x/t.safetensors") as reader:
            assert reader.infos == infos and reader.metadata == {"v": "1"}
            assert torch.equal(reader.read("a"), tensors[0]) and torch.equal(reader.read("b"), tensors[1])

    def test_a_blob_is_invisible_until_committed_and_replaced_whole(self, blobs):
        blobs.write_bytes("a/b", b"old")
        reader = blobs.open("a/b")  # opened before the new version lands
        writer = blobs.create("a/b")
        writer.file.write(b"new, longer")
        assert blobs.read_bytes("a/b") == b"old" and blobs.list("a") == ["b"]
        writer.commit()
        assert blobs.read_bytes("a/b") == b"new, longer"
        assert reader.read() == b"old"  # a reader keeps the version it opened
        reader.close()

    def test_an_aborted_write_leaves_no_trace(self, blobs):
        with pytest.raises(RuntimeError):
            with blobs.create("a/c") as writer:
                writer.file.write(b"partial")
                raise RuntimeError("the upload stopped")
        assert not blobs.exists("a/c") and blobs.list("a") == []
        assert blobs.drop_partial_writes() == 0

    def test_list_names_the_blobs_directly_in_a_folder(self, blobs):
        for key in ("j/theta_r1.safetensors", "j/secret.key", "j/rounds/r1/zbar.safetensors"):
            blobs.write_bytes(key, b"x")
        assert blobs.list("j") == ["secret.key", "theta_r1.safetensors"]
        assert blobs.list("j/rounds/r1") == ["zbar.safetensors"] and blobs.list("nothing") == []

    def test_delete_and_delete_folder(self, blobs):
        for key in ("j/a", "j/rounds/r1/s1_1", "j/rounds/r2/s1_1", "k/a"):
            blobs.write_bytes(key, b"x")
        blobs.delete("j/a")
        blobs.delete("j/a")  # nothing to delete: no error
        blobs.delete_folder("j/rounds")
        assert not blobs.exists("j/a") and blobs.list("j/rounds/r1") == [] and blobs.exists("k/a")

    def test_copy_import_and_chunks(self, blobs, tmp_path):
        source = tmp_path / "config.json"
        source.write_bytes(b"{}" * 700_000)
        blobs.import_file("j/public/config.json", source)
        blobs.copy("j/public/config.json", "j/copy.json")
        assert b"".join(blobs.chunks("j/copy.json")) == source.read_bytes()
        with pytest.raises(FileNotFoundError):
            blobs.chunks("j/none")

    @pytest.mark.parametrize("key", ["../x", "/abs", "a//b", ".hidden", "a/../b", "", "a/b/", "a b"])
    def test_keys_that_could_leave_the_store_are_refused(self, blobs, key):
        with pytest.raises(ValueError, match="blob key"):
            blobs.write_bytes(key, b"x")
        with pytest.raises(ValueError, match="blob key"):
            blobs.open(key)

    @pytest.mark.parametrize("operation", ["write", "fsync", "rename"])
    def test_a_failed_write_keeps_the_previous_blob_whole(self, blobs, faults, operation):
        blobs.write_bytes("r/s1.safetensors", b"previous")
        faults.fail(operation, ENOSPC, key="r/s1.safetensors")
        with pytest.raises(OSError, match="No space left"):
            blobs.write_bytes("r/s1.safetensors", b"next one")
        assert faults.fired == [(operation, "r/s1.safetensors")]
        assert blobs.read_bytes("r/s1.safetensors") == b"previous" and blobs.list("r") == ["s1.safetensors"]
        assert blobs.drop_partial_writes() == 0  # nothing left behind by the failed write
        blobs.write_bytes("r/s1.safetensors", b"next one")  # the fault fired once: a retry succeeds
        assert blobs.read_bytes("r/s1.safetensors") == b"next one"

    def test_a_failed_folder_sync_is_reported_and_never_exposes_a_partial_blob(self, blobs, faults):
        blobs.write_bytes("r/s1", b"previous")
        faults.fail("fsync_dir", OSError(errno.EIO, "I/O error"), key="r/s1")
        with pytest.raises(OSError, match="I/O error"):
            blobs.write_bytes("r/s1", b"next one")
        assert blobs.read_bytes("r/s1") in (b"previous", b"next one")

    def test_scratch_blobs_skip_the_syncs(self, blobs, faults):
        faults.fail("fsync", ENOSPC, times=None)
        faults.fail("fsync_dir", ENOSPC, times=None)
        with blobs.create("spool/upload", durable=False) as writer:
            writer.file.write(b"delta")
        assert blobs.read_bytes("spool/upload") == b"delta" and faults.fired == []

    def test_a_failed_delete_is_reported(self, blobs, faults):
        blobs.write_bytes("a/b", b"x")
        faults.fail("delete", ENOSPC, key="a/b")
        with pytest.raises(OSError):
            blobs.delete("a/b")
        assert blobs.exists("a/b")


class TestLocalBlobStore(BlobConformance):
    def make(self, faults, folder):
        return LocalBlobStore(folder, faults)

    def test_a_commit_syncs_the_file_and_its_folder(self, blobs, tmp_path, monkeypatch):
        """A committed blob survives a power loss: its data and its directory entry are synced."""
        synced: list[tuple[int, int]] = []
        real_fsync = os.fsync

        def recording(fd: int) -> None:
            info = os.fstat(fd)
            synced.append((info.st_dev, info.st_ino))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", recording)
        blobs.write_bytes("jobs/j/rounds/r1/s1_1.safetensors", b"S1")
        target = tmp_path / "blobs" / "jobs/j/rounds/r1/s1_1.safetensors"
        inode = lambda p: (p.stat().st_dev, p.stat().st_ino)  # noqa: E731
        assert inode(target) in synced and inode(target.parent) in synced
        assert inode(target.parent.parent) in synced  # the new folder r1 is synced into rounds/

    def test_private_blobs_are_0600_from_the_first_byte(self, blobs, tmp_path):
        previous = os.umask(0o022)
        try:
            writer = blobs.create("j/secret.key")
            temporary = [p for p in (tmp_path / "blobs" / "j").iterdir()]
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in temporary}
            writer.file.write(b"k")
            writer.commit()
            public = blobs.create("saves/model.safetensors", private=False)
            public.commit()
        finally:
            os.umask(previous)
        assert len(modes) == 1 and all(mode == 0o600 for mode in modes.values()), modes
        assert stat.S_IMODE((tmp_path / "blobs" / "j" / "secret.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "blobs" / "saves" / "model.safetensors").stat().st_mode) == 0o644

    def test_writes_a_crash_interrupted_are_dropped_at_start_up(self, blobs, tmp_path):
        writer = blobs.create("j/theta_r2.safetensors")
        writer.file.write(b"half of it")
        writer.file.flush()  # the process dies here: nothing commits or aborts
        restarted = LocalBlobStore(tmp_path / "blobs")
        assert restarted.list("j") == [] and restarted.drop_partial_writes() == 1
        assert list((tmp_path / "blobs" / "j").iterdir()) == []


class TestMemoryBlobStore(BlobConformance):
    def make(self, faults, folder):
        return MemoryBlobStore(faults)
