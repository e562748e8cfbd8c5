"""A step's batch in microbatches whose losses add up to the step's loss, exactly (DESIGN.md §6).

A step's batch is split by rows into S = world × accumulation contiguous slots (`torch.tensor_split`:
sizes differ by at most one row); process `rank` runs slots [rank·accum, (rank + 1)·accum), one
forward and backward pass each, and the gradients add up (over the passes in `.grad`, over the
processes in FSDP's sum reduction). Every loss of `pum.client.methods` is a sum over a batch's items
divided by a count (answer tokens for CE and the token-weighted losses, sequences for NPO, DPO and
SimNPO, attended tokens for RMU). Each slot therefore carries the whole step's counts under the
keys of `pum.client.methods.base` and divides its sums by them: Σ_slots Σ_slot / N = Σ_step / N, the
step's loss, where an average of per-slot means would weigh a slot of short answers like one of long
ones.

A slot with no rows (a batch shorter than S, e.g. the last batch of an epoch) still runs its pass,
because FSDP's collectives need every process in every pass: it gets the batch's first row as a
stand-in with infinite counts, so its loss is 0 and its gradient exactly 0.
"""

from __future__ import annotations

import math

import torch

from pum.client.methods.base import ANSWER_TOKENS, SEQUENCES, TOKENS, Batch, answer_mask


def step_counts(batch: Batch) -> dict[str, torch.Tensor]:
    """The step's normalisers (float32, 0-dim): answer tokens and attended tokens (at least 1), sequences."""
    return {
        ANSWER_TOKENS: answer_mask(batch["labels"]).sum().clamp(min=1).to(torch.float32),
        SEQUENCES: torch.tensor(float(batch["labels"].size(0))),
        TOKENS: batch["attention_mask"].sum().clamp(min=1).to(torch.float32),
    }


def split_rows(batch: Batch, slots: int) -> list[dict[str, torch.Tensor]]:
    """`batch` in `slots` contiguous row slices, each with the step's counts; an empty slice is a stand-in
    (the first row, infinite counts: loss 0, gradient 0). Every tensor of `batch` has one row per item."""
    if slots < 1:
        raise ValueError(f"slots must be ≥ 1 (got {slots})")
    rows = batch["labels"].size(0)
    bad = sorted(key for key, value in batch.items() if value.dim() == 0 or value.size(0) != rows)
    if bad:
        raise ValueError(f"batch tensors {bad} do not have one row per item ({rows}): they cannot be split into microbatches")
    counts = step_counts(batch)
    stand_in_counts = {key: torch.tensor(math.inf) for key in counts}
    parts = []
    for index in torch.tensor_split(torch.arange(rows), slots):
        if len(index):
            parts.append({**{key: value[index] for key, value in batch.items()}, **counts})
        else:
            parts.append({**{key: value[:1] for key, value in batch.items()}, **stand_in_counts})
    return parts


def microbatches(batch: Batch | None, rank: int, world: int, accumulation: int) -> list:
    """Process `rank`'s `accumulation` microbatches of a step's `batch` (None: `accumulation` Nones).

    One process without accumulation gets the batch itself, untouched (no count keys: the exact
    arithmetic of an unsplit step)."""
    if batch is None:
        return [None] * accumulation
    if world * accumulation == 1:
        return [batch]
    return split_rows(batch, world * accumulation)[rank * accumulation : (rank + 1) * accumulation]
