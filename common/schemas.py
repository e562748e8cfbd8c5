"""The wire contract: every request and reply body of the HTTP API as a pydantic model.

The server declares them as `response_model`s (so the OpenAPI document names each one) and the
client parses replies with the same classes. States travel as the enums of `pum.common.states`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from .privacy.report import CoalitionGuarantee, Guarantee, SeedFormula
from .states import CopyState, JobState, RoundState


class TaskSpec(BaseModel):
    """What a worker needs to run the inner unlearning method on its copy.

    `epochs` is the baseline's epoch budget (`local_epochs`); with `max_steps` None the worker
    auto-balances: the baseline's T steps are split over the rounds, round r running steps
    [⌊(r−1)·T/R⌋, ⌊r·T/R⌋) of one schedule, so PUM with R rounds does the baseline's work per copy
    (DESIGN.md §4). `reparameterized` tells the worker that copies come in secret, differently
    rotated bases, so its optimiser state must not carry from one copy to the next (DESIGN.md §6).
    """

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="inner unlearning method, a name in the client's registry")
    epochs: float = Field(gt=0, description="baseline epoch budget (local_epochs)")
    max_steps: int | None = Field(default=None, ge=1, description="steps per copy; None = auto-balance")
    rounds: int = Field(ge=1, description="rounds R of the job, for auto-balancing")
    reparameterized: bool = Field(
        default=False, description="copies are reparameterized (T_k): the worker starts each copy's optimiser fresh"
    )
    hyperparams: dict[str, Any] = Field(
        default_factory=dict, description="optimiser and method hyperparameters (lr, batch_size, beta, ...)"
    )
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        "auto", description="chat (the tokenizer's template), plain, or auto: chat when the tokenizer has one"
    )


class ErrorBody(BaseModel):
    """Every 4xx/5xx reply."""

    detail: str = Field(description="what is wrong and what to change")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


# ---- admin ------------------------------------------------------------------------------------
MAX_SPEC_DEPTH = 4  # settings and hyperparameters are flat (a list or mapping per layer group at most)
MAX_SPEC_VALUES = 10_000  # every value, key and list item counted


class JobCreate(BaseModel):
    task: str = Field(max_length=1000, description="task name; the merged model goes to saves/unlearn/<task>/")
    model_dir: str = Field(max_length=4096, description="Hugging Face model folder on the server (safetensors)")
    pum: dict[str, Any] = Field(default_factory=dict, description="PUM settings (DESIGN.md §8 names)")
    hyperparams: dict[str, Any] = Field(default_factory=dict, description="inner method hyperparameters for the workers")

    @field_validator("pum", "hyperparams")
    @classmethod
    def _bounded(cls, value: dict[str, Any], info) -> dict[str, Any]:
        """At most MAX_SPEC_DEPTH levels and MAX_SPEC_VALUES values (walked without recursion)."""
        pending, seen = [(value, 1)], 0
        while pending:
            node, depth = pending.pop()
            if depth > MAX_SPEC_DEPTH:
                raise ValueError(f"{info.field_name} is nested deeper than {MAX_SPEC_DEPTH} levels")
            children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
            seen += len(children)
            if seen > MAX_SPEC_VALUES:
                raise ValueError(f"{info.field_name} holds more than {MAX_SPEC_VALUES} values")
            pending += [(child, depth + 1) for child in children if isinstance(child, (dict, list))]
        return value


class TokenCreate(BaseModel):
    label: str = Field("worker", max_length=100, description="a name for the worker, shown in logs")
    party: str = Field("", max_length=100, description="the data owner the token belongs to; tokens of one party "
                       "are one adversary in the privacy report (default: every token is the job's one data owner)")


class TokenIssued(BaseModel):
    token: str = Field(description="the worker token; shown only in this reply (the server keeps its hash)")
    label: str
    party: str
    job_id: str


class CopyInfo(BaseModel):
    """One published copy of a round, as the admin sees it (the worker never learns k)."""

    k: int
    state: CopyState
    leases: int = Field(description="how many times the copy was leased")
    failures: int = Field(description="how many leases of it ended in a failure the worker reported")
    leased_at: float | None
    accepted_at: float | None
    worker: str | None = Field(None, description="label of the worker token of its latest lease (None: never leased)")
    seconds: float | None = Field(None, description="how long its latest lease has held it: until accepted, or until now")
    lease_ends: dict[str, int] = Field(default_factory=dict, description="its leases that ended without an upload, "
                                       "by how: expired (no heartbeat in time), failed (given back after a failure), "
                                       "released, cancelled, revoked")
    lease_id: str | None = Field(None, description="the copy's last lease: the one holding it while leased "
                                                     "(`pum admin revoke-lease` ends it)")


class RoundInfo(BaseModel):
    round: int
    state: RoundState
    accepted: int = Field(description="copies merged so far")
    sigmas: dict[str, float] = Field(description="σ_ℓ per layer group")
    started_at: float
    finished_at: float | None
    seconds: float | None = Field(None, description="how long the round has run: until merged, or until now")
    copies: list[CopyInfo]


class Progress(BaseModel):
    """How far a job is, and how fast it goes: the copies of all R rounds, accepted at the rate so far."""

    copies_accepted: int = Field(description="copies merged, over all rounds")
    copies_total: int = Field(description="m · R")
    seconds: float = Field(description="since the first round opened (0 before the start), until now or the job's end")
    copies_per_hour: float | None = Field(description="copies accepted per hour so far (None: none yet)")
    eta_s: float | None = Field(description="seconds left at that rate (None: no copy accepted yet, or the job ended)")
    copy_bytes: int | None = Field(description="bytes of one published copy of the current round (None: no open round)")


class JobSummary(BaseModel):
    id: str
    task: str
    state: JobState
    round: int = Field(description="the current round (0 before the start)")
    created_at: float


class CopyFailure(BaseModel):
    """The copy that failed a job: given back by its workers max_copy_failures times."""

    round: int
    k: int = Field(description="the copy's index in its round")
    failures: int = Field(description="how many times its workers gave it back")
    reasons: list[str] = Field(description="each worker's reason, oldest first (secrets redacted, at most 300 "
                                           "characters each)")


class JobStatus(JobSummary):
    rounds_R: int
    copies_m: int
    error: str | None
    failure: CopyFailure | None = Field(None, description="a failed job's failing copy and its workers' reasons")
    output_dir: str | None = Field(description="where the merged model was saved, once finalized")
    updated_at: float
    settings: dict[str, Any] = Field(description="the job's PUM settings, every field by name")
    hyperparams: dict[str, Any]
    rounds: list[RoundInfo]
    progress: Progress | None = None


class ModelFiles(BaseModel):
    files: list[str] = Field(description="file names of the finalized model")


class PrivacyReport(BaseModel):
    """The privacy report of a job over all its rounds (DESIGN.md §5): the fields of
    `pum.common.privacy.report.PrivacyReport` (a test keeps the two in step) and the job's id and
    state. An ε or μ is "inf" when unbounded, None when not computed."""

    job: str
    state: JobState
    epsilon: float | Literal["inf"] | None = Field(description="headline: the true ε against the largest party")
    unbounded: bool
    delta: float
    headline: str = Field(description="what the headline ε is")
    meaningful: bool = Field(description="an ε was computed (no_epsilon_reasons says why not)")
    rounds: int = Field(description="rounds accounted: the job's rounds_R")
    rounds_opened: int
    copies_m: int
    noise_structure: str
    noise_mode: str
    dp_target: str | None
    calibration: str | None
    seed_formula: SeedFormula
    true_release: Guarantee
    largest_coalition: CoalitionGuarantee
    sigmas: list[dict[str, float]] = Field(description="σ_ℓ per round")
    taus: list[dict[str, float]] = Field(description="τ_ℓ per round")
    sensitivities: list[dict[str, float | None]] = Field(description="Δ̄_ℓ = 2·C_ℓ per round (None: not clipped)")
    noise_total_variance: float | None
    jitter_total_variance: float | None
    no_epsilon_reasons: list[str]
    warnings: list[str]


# ---- workers ----------------------------------------------------------------------------------
class LeaseGranted(BaseModel):
    status: Literal["leased"] = "leased"
    lease_id: str = Field(description="opaque; names the copy in the calls that follow")
    job_id: str
    task_name: str
    round: int
    rounds_R: int
    ttl_s: float = Field(description="the lease ends unless renewed by a heartbeat within this many seconds")
    task: TaskSpec
    public_files: list[str] = Field(description="config and tokenizer files, from GET /v1/work/files/{name}")


class LeaseWait(BaseModel):
    status: Literal["wait"] = "wait"
    retry_after_s: float
    job_state: JobState


class LeaseDone(BaseModel):
    status: Literal["done"] = "done"
    job_state: JobState


LeaseReply = Annotated[Union[LeaseGranted, LeaseWait, LeaseDone], Field(discriminator="status")]
LEASE_REPLY: TypeAdapter[LeaseGranted | LeaseWait | LeaseDone] = TypeAdapter(LeaseReply)


class Heartbeat(BaseModel):
    lease_id: str
    ttl_s: float


class Release(BaseModel):
    reason: str = Field("", max_length=2000, description="why the worker gives the copy back")


class Released(BaseModel):
    released: bool = True


class Revoked(BaseModel):
    """What an admin revocation ended: the tokens revoked (0 for a lease) and the live leases ended."""

    job_id: str
    tokens: int = 0
    leases: list[str] = Field(default_factory=list)


class UploadKind(StrEnum):
    """What an upload holds (the `kind` query parameter of the upload route)."""

    DELTA = "delta"  # Δ' = trained − received, float32: exact
    DELTA_BF16 = "delta-bf16"  # Δ' rounded to bfloat16: half the bytes, ~0.2 % relative error of Δ' (bench/upload_dtype.py)
    TRAINED = "trained"  # the trained weights in the copy's dtypes, the server subtracts the copy: exact only
    # when the worker trained in those dtypes (float32-trained weights rounded to bf16 lose most of an lr-sized Δ)


class UploadAccepted(BaseModel):
    accepted: bool = True
    job_state: JobState
    round: int = Field(description="the job's round after this upload (a complete round steps at once)")
