"""The processes that train one copy together, as the trainer sees them (`DataParallel`).

`SingleProcess` is the usual worker; `pum.client.fsdp.FsdpGroup` is several processes under
torchrun, each holding a shard of the model (FSDP2). The optimiser state crosses this seam in full
form, `optimizer.state_dict()["state"]` keyed by the index of the trainable parameter, which is the
form `pum.client.carry` stores, so a round may run with another number of processes than the last.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch


def under_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def optimizer_state_problems(state: dict, shapes: list[tuple[int, ...]]) -> list[str]:
    """Why a carried `state_dict()["state"]` does not fit parameters of these shapes (at most 5 reasons; [] if it fits)."""
    problems = [f"state of parameter {i} but the optimiser has {len(shapes)}" for i in state if not 0 <= i < len(shapes)]
    for i, values in state.items():
        for key, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0 and 0 <= i < len(shapes) and tuple(value.shape) != shapes[i]:
                problems.append(f"parameter {i} {key}: shape {tuple(value.shape)} ≠ {shapes[i]}")
    return problems[:5]


def load_optimizer_state_inplace(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a carried `state_dict()["state"]` into `optimizer`, keeping its own param_groups (lr, betas…).

    ValueError when the state does not fit the parameters (another model, another optimiser).
    """
    shapes = [tuple(p.shape) for group in optimizer.param_groups for p in group["params"]]
    problems = optimizer_state_problems(state, shapes)
    if problems:
        raise ValueError("the carried optimiser state does not fit this model: " + "; ".join(problems))
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


class DataParallel(Protocol):
    """The processes that train one copy together; process `rank` of `world` runs its share of every step."""

    rank: int
    world: int

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the processes (every process gets it)."""

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
        """Start `optimizer` from a carried full state (None or empty: start fresh); process 0's state counts."""

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimiser's full state (on process 0; None on the others)."""


class SingleProcess:
    """One process holding the whole model."""

    rank, world = 0, 1

    def total(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def load_optimizer_state(self, model, optimizer, state) -> None:
        if state:
            load_optimizer_state_inplace(optimizer, state)

    def optimizer_state(self, model, optimizer) -> dict:
        return optimizer.state_dict()["state"]
