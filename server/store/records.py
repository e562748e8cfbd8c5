"""The records a store keeps: jobs (with their spec), rounds, copies, leases."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict

from pum.common.settings import PumSettings
from pum.common.states import CopyState, JobState, LeaseState, RoundState


class JobSpec(BaseModel):
    """What a job was created with and what creation derived from its model (stored as JSON)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: str
    pum: dict[str, Any]  # every PumSettings field by name
    hyperparams: dict[str, Any]
    dtypes: dict[str, str]  # the model's own dtype of each tensor, for publishing and the export
    clip_norms: dict[str, float | None] | None  # C_ℓ per layer group; None: no center clipping
    has_base: bool  # a public base model θ_base was given
    group_sizes: dict[str, int]  # d_ℓ: parameters per layer group
    shard_bytes: int = 5 * 10**9  # the export's largest shard: the input's, else Hugging Face's default (5 GB)
    device: str = "cpu"  # where the copies' noise is drawn (the server's --device at creation), fixed for the job

    @cached_property
    def settings(self) -> PumSettings:
        return PumSettings.from_spec(self.pum)

    @property
    def clipping(self) -> bool:
        """Center clipping is on: the one place this fact is read from."""
        return self.clip_norms is not None


@dataclass(frozen=True)
class Job:
    id: str
    task: str
    state: JobState
    round: int
    spec: JobSpec
    created_at: float
    updated_at: float
    error: str | None
    output_dir: str | None


@dataclass(frozen=True)
class Round:
    job_id: str
    round: int
    state: RoundState
    s0: float
    accepted: int
    s1_file: str | None  # the blob of the last accepted upload (S1 itself is summed only at the step)
    sigmas: dict[str, float]
    started_at: float
    finished_at: float | None
    taus: dict[str, float]  # jitter τ_ℓ per layer group ({} in a round stored before τ_ℓ was kept)


@dataclass(frozen=True)
class Copy:
    job_id: str
    round: int
    k: int
    state: CopyState
    lease_id: str | None
    leases: int
    failures: int
    leased_at: float | None
    accepted_at: float | None
    update_sums: dict[str, float] | None = None  # Σx² of Δ' per layer group, taken on receipt (update clipping)


@dataclass(frozen=True)
class Lease:
    id: str
    job_id: str
    round: int
    k: int
    token_hash: str
    state: LeaseState
    created_at: float
    expires_at: float
    reason: str = ""  # why its worker gave it back (sanitised), "" otherwise
