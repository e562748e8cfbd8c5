"""A job's blobs: where each lies in the state folder, and the reads and writes the rounds need.

Layout (keys under jobs/<id>/ of the state blob store):
    secret.key                         job key (0600): α_k, seeds and z̄ derive from it
    public/<name>                      the model's config, generation config, tokenizer (served to workers)
    theta_r{r}.safetensors             θ at the start of round r (float32)
    base.safetensors                   the public base model θ_base, when one is given
    reference_{i}.safetensors          public reference models, only while C_ℓ is computed at creation
    rounds/r{r}/theta_ref.safetensors  θ_ref of round r (center clipping only)
    rounds/r{r}/center.safetensors     the clipped center θ̃ of round r (center clipping only)
    rounds/r{r}/zbar.safetensors       z̄ of the round's zero-sum noise (secret)
    rounds/r{r}/upload_{lease}.safetensors  an upload, received under that lease; it counts once
                                       the store accepts the lease's copy (else start-up deletes it)

Every blob of a job is private (0600) and every write is atomic and durable.
"""

from __future__ import annotations

import json
from pathlib import Path

from pum.common.codec import SafetensorsFile, TensorInfo

from .blobs import BlobStore, BlobWriter, check_key


class JobFiles:
    def __init__(self, blobs: BlobStore, job_id: str):
        self.blobs = blobs
        self.root = f"jobs/{check_key(job_id)}"

    # ---- layout ------------------------------------------------------------------------------
    KEY = "secret.key"
    BASE = "base.safetensors"
    PUBLIC = "public"
    SPOOL = "spool"  # where uploads were received before they were kept in their round: start-up empties it

    @staticmethod
    def theta(round_: int) -> str:
        return f"theta_r{round_}.safetensors"

    @staticmethod
    def round_dir(round_: int) -> str:
        return f"rounds/r{round_}"

    @classmethod
    def theta_ref(cls, round_: int) -> str:
        return f"{cls.round_dir(round_)}/theta_ref.safetensors"

    @classmethod
    def clipped_center(cls, round_: int) -> str:
        return f"{cls.round_dir(round_)}/center.safetensors"

    @classmethod
    def center(cls, round_: int, clipping: bool) -> str:
        """θ̃ of the round: the clipped center when clipping is on, else θ itself."""
        return cls.clipped_center(round_) if clipping else cls.theta(round_)

    @classmethod
    def zbar(cls, round_: int) -> str:
        return f"{cls.round_dir(round_)}/zbar.safetensors"

    @classmethod
    def upload(cls, round_: int, lease_id: str) -> str:
        return f"{cls.round_dir(round_)}/{cls.UPLOAD_PREFIX}{lease_id}.safetensors"

    UPLOAD_PREFIX = "upload_"

    @staticmethod
    def reference(i: int) -> str:
        return f"reference_{i}.safetensors"

    @classmethod
    def public(cls, name: str) -> str:
        return f"{cls.PUBLIC}/{name}"

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    # ---- I/O ---------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.blobs.exists(self._key(name))

    def read(self, name: str) -> SafetensorsFile:
        """A safetensors blob of the job, for reading (a context manager)."""
        return self.blobs.safetensors(self._key(name))

    def create(self, name: str, *, durable: bool = True) -> BlobWriter:
        """A private blob being written: fill `.file`, then commit (or use it as a context manager)."""
        return self.blobs.create(self._key(name), private=True, durable=durable)

    def write_safetensors(self, name: str, infos: list[TensorInfo], tensors) -> None:
        self.blobs.write_safetensors(self._key(name), infos, tensors, private=True)

    def copy(self, source: str, target: str) -> None:
        self.blobs.copy(self._key(source), self._key(target), private=True)

    def import_file(self, name: str, path: Path) -> None:
        self.blobs.import_file(self._key(name), path, private=True)

    def delete(self, name: str) -> None:
        self.blobs.delete(self._key(name))

    def delete_folder(self, name: str) -> None:
        self.blobs.delete_folder(self._key(name))

    def delete_all(self) -> None:
        self.blobs.delete_folder(self.root)

    def list(self, folder: str = "") -> list[str]:
        """Blob names directly in `folder` of the job ("" for the job's own folder)."""
        return self.blobs.list(self._key(folder))

    def size(self, name: str) -> int:
        return self.blobs.size(self._key(name))

    def chunks(self, name: str):
        return self.blobs.chunks(self._key(name))

    # ---- the job's secret and public files ------------------------------------------------------
    def read_key(self) -> bytes:
        return self.blobs.read_bytes(self._key(self.KEY))

    def write_key(self, key: bytes) -> None:
        self.blobs.write_bytes(self._key(self.KEY), key, private=True)

    def public_names(self) -> list[str]:
        return self.list(self.PUBLIC)

    def public_config(self) -> dict:
        return json.loads(self.blobs.read_bytes(self._key(self.public("config.json"))))
