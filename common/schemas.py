"""Wire schemas shared by server and workers (pydantic models, JSON on the wire)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TaskSpec(BaseModel):
    """What a worker needs to run the inner unlearning method on its copy.

    `epochs` is the baseline's epoch budget (`local_epochs`); with `max_steps` None the worker
    auto-balances: it runs ceil(epochs · batches_per_epoch / rounds) steps per copy, so PUM
    with R rounds does the baseline's optimisation work per copy (DESIGN.md §4).
    """

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="inner unlearning method, a name in the client's registry")
    epochs: float = Field(gt=0, description="baseline epoch budget (local_epochs)")
    max_steps: int | None = Field(default=None, ge=1, description="steps per copy; None = auto-balance")
    rounds: int = Field(ge=1, description="rounds R of the job, for auto-balancing")
    hyperparams: dict[str, Any] = Field(
        default_factory=dict, description="optimiser and method hyperparameters (lr, batch_size, beta, ...)"
    )
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        "auto", description="chat (the tokenizer's template), plain, or auto: chat when the tokenizer has one"
    )
