"""The local unlearning loop a worker runs on its copy: batches, optimiser, schedule, method loss.

`TrainConfig.from_task(task)` turns the server's TaskSpec into a config, `planned_steps` sizes the
run (auto-balanced over the job's rounds, DESIGN.md §4) and `run_unlearning` trains the model in
place with the method from `pum.client.methods`.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import torch
from tqdm.auto import tqdm

from pum.client.methods import frozen_reference, get_method, parse_params
from pum.client.methods.idk import check_idk_answers
from pum.common.aliases import canonical_hyperparams
from pum.common.qa import QAPair, collate
from pum.common.schemas import TaskSpec

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear")
# TaskSpec.hyperparams keys that configure the loop; every other key is a method parameter.
TRAINER_KEYS = ("lr", "optimizer", "weight_decay", "batch_size", "warmup_steps", "warmup_epochs", "schedule",
                "max_length", "seed")


@dataclass(frozen=True)
class TrainConfig:
    method: str  # inner method, a name in pum.client.methods' registry
    params: Mapping[str, Any] = field(default_factory=dict)  # the method's hyperparameters (its Params fields)
    lr: float = 5e-5  # peak learning rate
    optimizer: str = "adamw"  # "adamw" or "sgd" (plain, no momentum)
    weight_decay: float = 0.01  # decoupled for AdamW, L2 for SGD
    batch_size: int = 32  # forget pairs per step; retain batches have the same size
    epochs: float = 5  # the baseline's epoch budget over the forget set (local_epochs)
    max_steps: int | None = None  # steps of this run; None = auto-balance (see planned_steps)
    rounds: int = 1  # rounds R of the PUM job; the epoch budget is split over them
    round: int = 1  # which of the R rounds this run is: its batches continue where round − 1 stopped
    warmup_steps: int = 0  # linear warm-up steps before the peak learning rate
    warmup_epochs: float | None = None  # warm-up in epochs of the forget set (open-unlearning's): see warmup_steps_for
    schedule: str = "constant"  # after warm-up: "constant", or "linear" decay towards 0 at the last step
    max_length: int = 512  # longest tokenized QA pair; prompts are cut from the left beyond it
    seed: int = 0  # seeds the batch order (and any dropout): same inputs and seed → same weights

    def __post_init__(self):
        method = get_method(self.method)  # ValueError listing the known names
        parse_params(method, self.params)  # ValueError naming unknown keys
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be ≥ 0 (got {self.weight_decay})")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0 (got {self.epochs})")
        for name, least in (("batch_size", 1), ("rounds", 1), ("round", 1), ("max_length", 2), ("warmup_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer ≥ {least} (got {value!r})")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be None (auto-balance) or an integer ≥ 1 (got {self.max_steps!r})")
        if self.warmup_epochs is not None and (isinstance(self.warmup_epochs, bool) or not self.warmup_epochs >= 0
                                               or self.warmup_steps):
            raise ValueError(f"warmup_epochs must be a number ≥ 0, and warmup_steps unset (got {self.warmup_epochs!r}, "
                             f"warmup_steps {self.warmup_steps})")
        if self.round > self.rounds:
            raise ValueError(f"round must be ≤ rounds = {self.rounds} (got {self.round})")

    @classmethod
    def from_task(cls, task: TaskSpec, round_: int = 1) -> TrainConfig:
        """The config of a server's TaskSpec: loop keys of `hyperparams` go to the loop, the rest to the method.

        `round_` is the lease's round (1-based): it places the run's batches after the earlier rounds'.
        An unknown key is refused with a ValueError listing both sets of allowed keys.
        """
        method = get_method(task.method)
        hyper = canonical_hyperparams(task.hyperparams)  # open-unlearning's names too (pum.common.aliases)
        loop = {key: hyper.pop(key) for key in TRAINER_KEYS if key in hyper}
        allowed_params = list(method.Params.__dataclass_fields__)
        unknown = sorted(set(hyper) - set(allowed_params))
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for method {method.name!r}; "
                f"allowed: {', '.join(TRAINER_KEYS)} (trainer) and {', '.join(allowed_params) or 'none'} (method)"
            )
        for key in ("lr", "weight_decay", "warmup_epochs"):
            if key in loop and isinstance(loop[key], int) and not isinstance(loop[key], bool):
                loop[key] = float(loop[key])
        return cls(
            method=method.name, params=hyper, epochs=task.epochs, max_steps=task.max_steps, rounds=task.rounds,
            round=round_, **loop,
        )


def planned_steps(config: TrainConfig, n_forget: int) -> int:
    """Steps of one run: `max_steps` if set, else ceil(epochs · ceil(n_forget / batch_size) / rounds).

    The auto-balanced count splits the baseline's budget over the job's R rounds, so PUM with R
    rounds does the baseline's optimisation work per copy (DESIGN.md §4). Computed in exact
    rationals (0.3 epochs of 10 batches is 3 steps, not 4).
    """
    if config.max_steps is not None:
        return config.max_steps
    if n_forget < 1:
        raise ValueError(f"the forget set is empty (got {n_forget} pairs): there is nothing to unlearn")
    batches_per_epoch = math.ceil(n_forget / config.batch_size)
    return max(1, math.ceil(Fraction(repr(float(config.epochs))) * batches_per_epoch / config.rounds))


def warmup_steps_for(config: TrainConfig, n_forget: int) -> int:
    """`warmup_steps`, or ⌊warmup_epochs · n_forget / batch_size⌋ as open-unlearning computes it (its batch being
    per-device size × accumulation × devices, PUM's `batch_size`)."""
    if config.warmup_epochs is None:
        return config.warmup_steps
    return int(Fraction(repr(float(config.warmup_epochs))) * n_forget // config.batch_size)


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


def _batches(pairs: list[QAPair], batch_size: int, generator: torch.Generator) -> Iterator[list[QAPair]]:
    """Endless batches: each pass over `pairs` in a fresh random order; the last batch may be short."""
    while True:
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [pairs[i] for i in order[start : start + batch_size]]


def _round_batches(pairs: list[QAPair], config: TrainConfig, seed: int, steps: int) -> Iterator[list[QAPair]]:
    """This round's share of the seed's batch stream: round r starts after the (r − 1)·steps batches of
    the rounds before it, so over R rounds a copy sees the baseline's sequence of batches."""
    stream = _batches(pairs, config.batch_size, torch.Generator().manual_seed(seed))
    return itertools.islice(stream, (config.round - 1) * steps, None)


def _optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, weight_decay=config.weight_decay)


def run_unlearning(
    model: torch.nn.Module,
    tokenizer,
    forget: list[QAPair],
    retain: list[QAPair] | None,
    config: TrainConfig,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    log: Callable[[dict], None] | None = None,
    idk_answers: Sequence[str] | None = None,
) -> dict:
    """Run the config's unlearning method on `model`, in place, for `planned_steps` steps.

    Forget pairs (and retain pairs, cycled independently with the same batch size) are shuffled
    by generators seeded with `config.seed`; round r > 1 starts after the batches of the rounds
    before it. One optimiser covers every trainable parameter (a fresh one each round). The
    reference model, where the method reads one, is a frozen copy of `model` as given. Forget
    batches are built by the method's `collate_forget`, with a third generator (seed + 2) for any
    per-batch choice it makes (DPO's "I don't know" answers, taken from `idk_answers` when given,
    else from the packaged TOFU list). Runs on `device` when given (the model is moved there),
    else on the model's device. `log` receives {"step", "loss", "lr", "seconds"} after each step.
    Returns {"steps", "seconds", "first_loss", "last_loss", "method"}. Deterministic: the same
    model, data, config and idk answers give the same weights.
    """
    method = get_method(config.method)
    params = parse_params(method, config.params)
    if not forget:
        raise ValueError("the forget set is empty: there is nothing to unlearn")
    if idk_answers is not None:
        idk_answers = check_idk_answers(idk_answers)
    use_retain = method.uses_retain(params)
    if use_retain and not retain:
        raise ValueError(
            f"method {method.name!r} needs a retain set (its retain weight alpha is {getattr(params, 'alpha', '?')}); "
            "give retain pairs, or set alpha to 0"
        )
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    steps = planned_steps(config, len(forget))
    reference = frozen_reference(model) if method.uses_reference(params) else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    optimizer = _optimizer(config, trainable)
    warmup = warmup_steps_for(config, len(forget))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, config.schedule))
    forget_batches = _round_batches(forget, config, config.seed, steps)
    retain_batches = _round_batches(retain, config, config.seed + 1, steps) if use_retain else None
    method_generator = torch.Generator().manual_seed(config.seed + 2)

    def on_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batch.items()}

    def forget_batch_of(pairs: list[QAPair]) -> dict[str, torch.Tensor]:
        return on_device(
            method.collate_forget(
                tokenizer, pairs, params, max_length=config.max_length, generator=method_generator,
                idk_answers=idk_answers,
            )
        )

    was_training = model.training
    model.train()
    first_loss = last_loss = float("nan")
    start = time.perf_counter()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), tqdm(total=steps, disable=not progress, desc=method.name) as bar:
        torch.manual_seed(config.seed)
        try:
            for step in range(steps):
                forget_batch = forget_batch_of(next(forget_batches))
                retain_batch = (
                    on_device(collate(tokenizer, next(retain_batches), config.max_length))
                    if retain_batches is not None
                    else None
                )
                optimizer.zero_grad(set_to_none=True)
                loss = method.loss(model, reference, forget_batch, retain_batch, params)
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"{method.name} loss is {value} at step {step + 1} of {steps}: lower lr (now {config.lr})"
                    )
                loss.backward()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                if step == 0:
                    first_loss = value
                last_loss = value
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                if log is not None:
                    log({"step": step + 1, "loss": value, "lr": lr, "seconds": time.perf_counter() - start})
        finally:
            optimizer.zero_grad(set_to_none=True)
            model.train(was_training)
    seconds = time.perf_counter() - start
    logger.info("%s: %d steps in %.1f s, loss %.4f → %.4f", method.name, steps, seconds, first_loss, last_loss)
    return {"steps": steps, "seconds": seconds, "first_loss": first_loss, "last_loss": last_loss, "method": method.name}
