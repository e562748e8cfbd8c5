"""Which steps a round runs, and at what learning rate: one schedule over the whole job (DESIGN.md §4).

The baseline runs T steps. A PUM job of R rounds runs, in round r, the global steps

    [⌊(r − 1)·T/R⌋, ⌊r·T/R⌋)

of the same batch stream and the same learning-rate schedule (warm-up and decay planned over T),
so R rounds do exactly the baseline's T steps, and a copy's step s sees the batch and the
learning rate the baseline's step s saw. With `global_schedule` off (the behaviour before issue
10, kept as a setting to measure what the split does) every round runs ⌈T/R⌉ steps under its own
schedule, which is R·⌈T/R⌉ ≥ T steps in all.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction


def total_steps(epochs: float, n_forget: int, batch_size: int, rounds: int, max_steps: int | None) -> int:
    """T, the baseline's steps: ⌈epochs·⌈n_forget/batch_size⌉⌉ (at least 1), or max_steps·rounds when
    `max_steps` fixes the steps of every round. Exact rationals: 0.3 epochs of 10 batches is 3 steps, not 4."""
    if max_steps is not None:
        return max_steps * rounds
    if n_forget < 1:
        raise ValueError(f"the forget set is empty (got {n_forget} pairs): there is nothing to unlearn")
    batches_per_epoch = math.ceil(n_forget / batch_size)
    return max(1, math.ceil(Fraction(repr(float(epochs))) * batches_per_epoch))


def round_steps(total: int, rounds: int, round_: int, global_schedule: bool = True) -> range:
    """The global step indices round `round_` (1-based) of `rounds` runs, out of `total`.

    global_schedule: [⌊(r−1)·T/R⌋, ⌊r·T/R⌋) — consecutive rounds tile [0, T) exactly (a round may be
    empty when T < R). Otherwise [(r−1)·⌈T/R⌉, r·⌈T/R⌉): every round ⌈T/R⌉ steps.
    """
    if not 1 <= round_ <= rounds:
        raise ValueError(f"round must be in 1..{rounds} (got {round_})")
    if global_schedule:
        return range((round_ - 1) * total // rounds, round_ * total // rounds)
    per_round = math.ceil(total / rounds)
    return range((round_ - 1) * per_round, round_ * per_round)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at 0-based `step` of `total`.

    Warm-up: (step + 1)/(warmup + 1) for step < warmup (never 0, so no step is wasted). Then 1
    (`constant`), or (total − step)/(total − warmup) (`linear`: 1 right after warm-up, 1/(total −
    warmup) at the last step).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    return 1.0


def step_seed(seed: int, step: int) -> int:
    """The seed of global step `step` of a run seeded `seed`: whichever round runs the step draws the
    same randomness (dropout, DPO's "I don't know" answers). 63 bits of SHA-256("seed:step")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little") >> 1
