"""The local unlearning loop a worker runs on its copy: batches, optimiser, schedule, method loss.

`TrainConfig.from_task(task)` turns the server's TaskSpec into a config, `planned_steps` sizes the
run (this round's share of the baseline's T steps, `pum.client.schedule`) and `run_unlearning`
trains the model in place with the method from `pum.client.methods`. What a data owner carries
from one round to the next (the job's reference model, the optimiser state) comes in and goes out
through `Carried` (DESIGN.md §6); `pum.client.carry` keeps it on the worker's disk.

How a step is computed, for models that do not fit one pass or one GPU: gradient accumulation
(`pum.client.microbatch`: the step's batch in microbatches whose losses add up to the step's loss),
gradient checkpointing, bf16 autocast on GPUs, and several processes training one copy
(`DataParallel`; `pum.client.fsdp` shards the model with FSDP2). Only bf16 autocast changes the
result beyond float rounding.
"""

from __future__ import annotations

import contextlib
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
from pum.client.microbatch import microbatches
from pum.client.parallel import DataParallel, SingleProcess
from pum.common.aliases import canonical_hyperparams
from pum.client.schedule import lr_factor, round_steps, step_seed, total_steps
from pum.common.qa import QAPair, collate
from pum.common.schemas import TaskSpec

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear")
# TaskSpec.hyperparams keys that configure the loop; every other key is a method parameter.
TRAINER_KEYS = ("lr", "optimizer", "weight_decay", "batch_size", "warmup_steps", "warmup_epochs", "schedule",
                "max_length", "seed", "max_grad_norm", "carry_reference", "carry_optimizer", "global_schedule",
                "gradient_accumulation_steps", "gradient_checkpointing", "bf16_autocast")
_FLAGS = ("carry_reference", "carry_optimizer", "global_schedule", "gradient_checkpointing", "bf16_autocast")


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
    warmup_steps: int = 0  # linear warm-up steps before the peak learning rate (of the job's T steps)
    warmup_epochs: float | None = None  # warm-up in epochs of the forget set (open-unlearning's): see warmup_steps_for
    schedule: str = "constant"  # after warm-up: "constant", or "linear" decay towards 0 at the job's last step
    max_length: int = 512  # longest tokenized QA pair; prompts are cut from the left beyond it
    seed: int = 0  # seeds the batch order (and any dropout): same inputs and seed → same weights
    max_grad_norm: float | None = 1.0  # clip the gradient's global L2 norm (HF Trainer, open-unlearning); None: off
    # What a data owner carries across the rounds of a job (DESIGN.md §6); each can be turned off to measure it.
    carry_reference: bool = True  # the reference model is the job's first copy, not each round's copy
    carry_optimizer: bool = True  # the optimiser state continues from round r − 1 (never with reparameterization)
    global_schedule: bool = True  # round r runs steps [⌊(r−1)T/R⌋, ⌊rT/R⌋) of one schedule; False: ⌈T/R⌉ each, restarted
    # How a step is computed: memory for speed, never the step itself (bf16 autocast aside).
    gradient_accumulation_steps: int = 1  # passes per step and process: each runs batch_size/(processes·this) pairs
    gradient_checkpointing: bool = False  # keep only each decoder block's input; recompute the rest in the backward
    bf16_autocast: bool = False  # bfloat16 matmuls on a GPU that supports them (else float32, with a warning);
    # the weights, their gradients and the optimiser state stay float32

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
        for name, least in (("batch_size", 1), ("rounds", 1), ("round", 1), ("max_length", 2), ("warmup_steps", 0),
                            ("gradient_accumulation_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer ≥ {least} (got {value!r})")
        if self.max_grad_norm is not None and (isinstance(self.max_grad_norm, bool) or not self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0, or None for no clipping (got {self.max_grad_norm!r})")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (got {getattr(self, name)!r})")
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
        An unknown key is refused with a ValueError listing both sets of allowed keys. A reparameterized
        task turns `carry_optimizer` off.
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
        for key in ("lr", "weight_decay", "warmup_epochs", "max_grad_norm"):
            if key in loop and isinstance(loop[key], int) and not isinstance(loop[key], bool):
                loop[key] = float(loop[key])
        if task.reparameterized and loop.get("carry_optimizer", True):
            # Each copy comes in its own secret rotated basis: moments from another copy point the wrong way.
            logger.info("copies are reparameterized: the optimiser state does not carry across copies")
            loop["carry_optimizer"] = False
        return cls(
            method=method.name, params=hyper, epochs=task.epochs, max_steps=task.max_steps, rounds=task.rounds,
            round=round_, **loop,
        )


def job_steps(config: TrainConfig, n_forget: int) -> int:
    """T, the baseline's steps over the job (see `pum.client.schedule.total_steps`)."""
    return total_steps(config.epochs, n_forget, config.batch_size, config.rounds, config.max_steps)


def steps_of_round(config: TrainConfig, n_forget: int) -> range:
    """The global steps this run does: round r's share of the job's T steps."""
    return round_steps(job_steps(config, n_forget), config.rounds, config.round, config.global_schedule)


def planned_steps(config: TrainConfig, n_forget: int) -> int:
    """Steps of this run: ⌊r·T/R⌋ − ⌊(r−1)·T/R⌋ (⌈T/R⌉ with `global_schedule` off; `max_steps` if set).

    Over the job's R rounds a copy does exactly the baseline's T steps (DESIGN.md §4).
    """
    return len(steps_of_round(config, n_forget))


def warmup_steps_for(config: TrainConfig, n_forget: int) -> int:
    """`warmup_steps`, or ⌊warmup_epochs · n_forget / batch_size⌋ as open-unlearning computes it (its batch being
    per-device size × accumulation × devices, PUM's `batch_size`). Warm-up is part of the job's one schedule."""
    if config.warmup_epochs is None:
        return config.warmup_steps
    return int(Fraction(repr(float(config.warmup_epochs))) * n_forget // config.batch_size)


def _batches(pairs: list[QAPair], batch_size: int, generator: torch.Generator) -> Iterator[list[QAPair]]:
    """Endless batches: each pass over `pairs` in a fresh random order; the last batch may be short."""
    while True:
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [pairs[i] for i in order[start : start + batch_size]]


def _stream_from(pairs: list[QAPair], batch_size: int, seed: int, first_step: int) -> Iterator[list[QAPair]]:
    """The seed's batch stream from global step `first_step` on: round r continues where r − 1 stopped,
    so over R rounds a copy sees the baseline's sequence of batches."""
    stream = _batches(pairs, batch_size, torch.Generator().manual_seed(seed))
    return itertools.islice(stream, first_step, None)


def _optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class Carried:
    """What a data owner carries from one round of a job to the next (DESIGN.md §6).

    `reference`: the job's reference model (frozen), or None for a frozen copy of the model as given
    (round 1, or the baseline). `optimizer_state`: the optimiser's `state_dict()["state"]` at the end
    of round r − 1, or None to start fresh. `run_unlearning` replaces `optimizer_state` with the state
    at the end of its run (when `carry_optimizer` is on).
    """

    reference: torch.nn.Module | None = None
    optimizer_state: dict | None = None


def bf16_autocast_on(device: torch.device, asked: bool) -> bool:
    """Whether to run under bfloat16 autocast: asked for, on a CUDA device that supports it (else a warning)."""
    if asked and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        logger.warning("bf16_autocast: %s has no bfloat16 autocast here; training in float32", device)
        return False
    return asked


def autocast(device: torch.device, on: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on `device` when `on`: matmuls in bf16, the weights stay float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


@contextlib.contextmanager
def checkpointing(model: torch.nn.Module, enabled: bool):
    """Gradient checkpointing (transformers' non-reentrant one) on `model` while inside, when `enabled`."""
    if enabled and not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(f"gradient_checkpointing needs a transformers model ({type(model).__name__} is not one)")
    # transformers 5 names it activation checkpointing and checkpoints `forward`, so FSDP2's hooks run once.
    new_names = hasattr(model, "activation_checkpointing_enable")
    if not enabled or getattr(model, "is_activation_checkpointing" if new_names else "is_gradient_checkpointing"):
        yield
        return
    if new_names:
        model.activation_checkpointing_enable({"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


def _clip(parameters: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the gradients' global L2 norm to `max_norm`; the norm before clipping (nan when off)."""
    if max_norm is None:
        return float("nan")
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor when sharded


def run_unlearning(
    model: torch.nn.Module,
    tokenizer,
    forget: list[QAPair],
    retain: list[QAPair] | None,
    config: TrainConfig,
    *,
    carried: Carried | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    log: Callable[[dict], None] | None = None,
    idk_answers: Sequence[str] | None = None,
    parallel: DataParallel | None = None,
) -> dict:
    """Run the config's unlearning method on `model`, in place, for this round's steps of the job.

    Round r runs the global steps `steps_of_round(config, len(forget))` of one batch stream and one
    learning-rate schedule over the job's T steps: forget pairs (and retain pairs, cycled
    independently with the same batch size) are shuffled by generators seeded with `config.seed`,
    and step s draws its other randomness (dropout; the method's per-batch choices such as DPO's "I
    don't know" answers, from `idk_answers` or the packaged TOFU list) from `step_seed(seed, s)`.
    So R rounds run back to back replay the baseline's steps exactly. Gradients are clipped to
    `max_grad_norm`. One optimiser covers every trainable parameter; it starts from
    `carried.optimizer_state` when given and `carry_optimizer` is on, and leaves its final state
    there. The reference model, where the method reads one, is `carried.reference`, else a frozen
    copy of `model` as given. Runs on `device` when given (the model is moved there), else on the
    model's device. With `parallel` (several processes, each holding a shard of `model`), each
    process runs its microbatches of every step, and the reference must be given. `log` receives {"step", "global_step", "loss", "lr", "grad_norm", "seconds"}
    after each step. Returns {"steps", "first_step", "total_steps", "seconds", "first_loss",
    "last_loss", "method"}.
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
    parallel = parallel if parallel is not None else SingleProcess()
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    carried = carried if carried is not None else Carried()
    total = job_steps(config, len(forget))
    steps = steps_of_round(config, len(forget))
    # The schedule spans the job (global) or restarts each round over its own steps.
    schedule_total, schedule_offset = (total, 0) if config.global_schedule else (len(steps), steps.start)
    warmup = warmup_steps_for(config, len(forget))
    reference = None
    if method.uses_reference(params):
        if carried.reference is None and parallel.world > 1:
            raise ValueError(f"{method.name} reads a reference model: give it (sharded) to a run of several processes")
        reference = carried.reference if carried.reference is not None else frozen_reference(model)
        reference.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    optimizer = _optimizer(config, trainable)
    if config.carry_optimizer:
        parallel.load_optimizer_state(model, optimizer, carried.optimizer_state)
    forget_batches = _stream_from(forget, config.batch_size, config.seed, steps.start)
    retain_batches = _stream_from(retain, config.batch_size, config.seed + 1, steps.start) if use_retain else None

    def on_device(batch: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        return {k: v.to(device) for k, v in batch.items()} if batch is not None else None

    def my_parts(batch: dict[str, torch.Tensor] | None) -> list:
        return microbatches(batch, parallel.rank, parallel.world, config.gradient_accumulation_steps)

    bf16 = bf16_autocast_on(device, config.bf16_autocast)
    was_training = model.training
    model.train()
    first_loss = last_loss = float("nan")
    start = time.perf_counter()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with (torch.random.fork_rng(devices=cuda), checkpointing(model, config.gradient_checkpointing),
          tqdm(total=len(steps), disable=not progress, desc=method.name) as bar):
        try:
            for local, step in enumerate(steps):
                seed = step_seed(config.seed, step)
                torch.manual_seed(seed)
                forget_batch = method.collate_forget(
                    tokenizer, next(forget_batches), params, max_length=config.max_length,
                    generator=torch.Generator().manual_seed(seed), idk_answers=idk_answers,
                )
                retain_batch = collate(tokenizer, next(retain_batches), config.max_length) if retain_batches else None
                lr = config.lr * lr_factor(step - schedule_offset, schedule_total, warmup, config.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), device=device)
                for forget_part, retain_part in zip(my_parts(forget_batch), my_parts(retain_batch)):
                    with autocast(device, bf16):
                        loss = method.loss(model, reference, on_device(forget_part), on_device(retain_part), params)
                    loss.backward()  # the parts' gradients add up to the step's (each part's loss is its share)
                    step_loss += loss.detach().float()
                value = parallel.total(step_loss).item()  # the step's loss; every process sees the same value
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"{method.name} loss is {value} at step {local + 1} of {len(steps)}: lower lr (now {config.lr})"
                    )
                grad_norm = _clip(trainable, config.max_grad_norm)
                optimizer.step()
                if local == 0:
                    first_loss = value
                last_loss = value
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                if log is not None:
                    log({"step": local + 1, "global_step": step + 1, "loss": value, "lr": lr,
                         "grad_norm": grad_norm, "seconds": time.perf_counter() - start})
        finally:
            optimizer.zero_grad(set_to_none=True)
            model.train(was_training)
    if config.carry_optimizer:
        carried.optimizer_state = parallel.optimizer_state(model, optimizer)
    seconds = time.perf_counter() - start
    logger.info("%s: steps %d–%d of %d in %.1f s, loss %.4f → %.4f", method.name, steps.start + 1, steps.stop, total,
                seconds, first_loss, last_loss)
    return {"steps": len(steps), "first_step": steps.start, "total_steps": total, "seconds": seconds,
            "first_loss": first_loss, "last_loss": last_loss, "method": method.name}
