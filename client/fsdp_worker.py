"""A worker whose copy is trained by several processes of one machine (one per GPU): FSDP2 under torchrun.

    pum worker --nproc-per-node N …              (re-executes itself under torch.distributed.run)
    torchrun --nproc-per-node N -m pum.cli worker …

Who does what:

- Process 0 is the worker the server sees: it leases, heartbeats, downloads the copy into a
  temporary folder, checks it, reads the carried state (`pum.client.carry`), and sends the others
  a "train" message (JSON over a gloo group, never pickle).
- Every process reads the config and tokenizer from that folder (the processes share the machine),
  builds the model and, when the method reads one, the reference model, both sharded with FSDP2
  (`pum.client.fsdp.build_sharded`; weights streamed from process 0), and trains its slots of every
  step (`pum.client.microbatch`). The reference is sharded, not replicated: a whole copy per GPU is
  what does not fit.
- Process 0 gathers the trained weights tensor by tensor while it writes Δ, keeps the optimiser
  state (full form: a later round may run on another number of GPUs, or one), and uploads.

Failures: what process 0 finds before the "train" message (a refused copy, a broken carry file) is
an ordinary failed copy: the lease goes back, the others never hear of it. In training, every process
sees the same summed loss, so a non-finite loss (FloatingPointError) or a broadcast check (ValueError)
stops all of them at the same point, and the worker goes on with the next copy. Anything else leaves
the processes out of step: that process stops, and torchrun stops the others (the lease expires).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from pum.common.prompts import QAEncoder
from pum.common.qa import QAPair
from pum.common.schemas import TaskSpec

from .carry import carried_optimizer_state, reference_file, weight_mismatches
from .fsdp import FsdpGroup, build_sharded, full_tensors, meta_model
from .methods import get_method, parse_params
from .trainer import Carried, TrainConfig, bf16_autocast_on, run_unlearning
from .worker import FatalWorkerError, ReceivedCopy, Worker, write_delta

log = logging.getLogger(__name__)

SHARED_FAILURES = (FloatingPointError, ValueError)  # raised by every process at the same point


def relaunch_under_torchrun(nproc: int, argv: Sequence[str]) -> None:
    """Replace this process by `python -m torch.distributed.run --standalone --nproc-per-node N -m pum.cli …argv`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "pum.cli", *argv]
    log.info("starting %d training processes: %s", nproc, " ".join(command))
    os.execv(sys.executable, command)


class FsdpCopyTrainer:
    """Process 0's `CopyTrainer`: prepares the copy, trains it with the group, writes Δ."""

    def __init__(self, group: FsdpGroup, forget: list[QAPair], retain: list[QAPair] | None,
                 idk_answers: Sequence[str] | None = None, progress: bool = False):
        self.group, self.forget, self.retain = group, forget, retain
        self.idk_answers, self.progress = idk_answers, progress

    def __call__(self, copy: ReceivedCopy, delta_path: Path) -> dict:
        reference, state = self._prepare(copy)
        names = list(copy.received)
        self.group.broadcast_json({"op": "train", "folder": str(copy.folder), "round": copy.round, "names": names,
                                   "task": copy.task.model_dump(mode="json")})
        try:
            model, train, carried = train_together(
                self.group, copy.folder, copy.task, copy.config, self.forget, self.retain, self.idk_answers,
                weights=copy.received, reference=reference, optimizer_state=state, log=copy.log, progress=self.progress)
            gathered = full_tensors(model, names, self.group)
            try:
                write_delta(copy.received, gathered, delta_path)
            finally:
                for _ in gathered:  # a failed write must not leave the others waiting in a gather
                    pass
        except SHARED_FAILURES:
            raise
        except Exception as err:
            raise FatalWorkerError(f"training processes out of step after {type(err).__name__}: {err}") from err
        if copy.config.carry_optimizer:
            copy.store.save_optimizer_state(copy.round, carried.optimizer_state or {})
        return {**train, "processes": self.group.world}

    def _prepare(self, copy: ReceivedCopy) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
        """Everything only process 0 can check, before the others hear of the copy: the copy fits the
        served config, the retain set is there if needed, the carried reference and optimiser state load."""
        config = copy.config
        method = get_method(config.method)
        params = parse_params(method, config.params)
        if method.uses_retain(params) and not self.retain:
            raise ValueError(f"method {method.name!r} needs a retain set: give the worker --retain")
        shape = meta_model(copy.folder)
        problems = weight_mismatches(shape, {n: t.shape for n, t in copy.received.items()})
        if any(problems.values()):
            raise ValueError(f"the copy does not fit its served config: {problems}")
        source = reference_file(copy.store, config, copy.file, copy.round)
        reference = None
        if source is not None:
            reference = copy.received if source == copy.file else load_file(source)
            problems = weight_mismatches(shape, {n: t.shape for n, t in reference.items()})
            if any(problems.values()):
                raise ValueError(f"the kept reference does not fit this copy ({problems}): delete the job's carry "
                                 "folder if the job was recreated")
        return reference, carried_optimizer_state(copy.store, config, copy.round)


def train_together(
    group: FsdpGroup, folder: Path, task: TaskSpec, config: TrainConfig, forget: list[QAPair], retain: list[QAPair] | None,
    idk_answers: Sequence[str] | None, *, weights=None, reference=None, optimizer_state=None, log=None,
    progress: bool = False,
) -> tuple[torch.nn.Module, dict, Carried]:
    """Every process: build the sharded model (and reference) from process 0's tensors and train it.

    `weights`, `reference`, `optimizer_state`, `log`: process 0's (None on the others)."""
    from transformers import AutoTokenizer

    method = get_method(config.method)
    bf16 = bf16_autocast_on(group.device, config.bf16_autocast)
    model = build_sharded(folder, group, weights, trainable=True, bf16=bf16)
    frozen = None
    if method.uses_reference(parse_params(method, config.params)):
        frozen = build_sharded(folder, group, reference, trainable=False, bf16=bf16)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    tokenizer = QAEncoder(tokenizer, task.prompt_format)  # the job's prompt format for every batch
    carried = Carried(reference=frozen, optimizer_state=optimizer_state)
    train = run_unlearning(model, tokenizer, forget, retain, config, carried=carried, parallel=group,
                           log=log if group.rank == 0 else None, progress=progress and group.rank == 0,
                           idk_answers=idk_answers)
    return model, train, carried


def follow(group: FsdpGroup, forget: list[QAPair], retain: list[QAPair] | None,
           idk_answers: Sequence[str] | None = None) -> int:
    """Processes 1..N−1: train every copy process 0 announces, until it says stop; the number trained."""
    trained = 0
    while True:
        message = group.broadcast_json()
        if message["op"] == "stop":
            return trained
        task = TaskSpec.model_validate(message["task"])
        config = TrainConfig.from_task(task, round_=message["round"])
        try:
            model, _, _ = train_together(group, Path(message["folder"]), task, config, forget, retain, idk_answers)
            for _ in full_tensors(model, message["names"], group):
                pass
            trained += 1
        except SHARED_FAILURES as err:  # process 0 raised it too, at the same point
            log.warning("process %d: the copy failed on every process: %s", group.rank, err)


def run_group_worker(open_api, forget: list[QAPair], retain: list[QAPair] | None, options) -> int | None:
    """This process's part of a multi-process worker (under torchrun): process 0 runs the `Worker` loop
    with an `FsdpCopyTrainer` and returns its copies; the others follow it and return None.

    `open_api`: a context manager factory giving process 0's `WorkerAPI`."""
    group = FsdpGroup.start(options.device)
    if group.rank != 0:
        follow(group, forget, retain, options.idk_answers)
        group.close()
        return None
    trainer = FsdpCopyTrainer(group, forget, retain, options.idk_answers, options.progress)
    try:
        with open_api() as api:
            done = Worker(api, forget, retain, options, trainer=trainer).run()
    except FatalWorkerError:
        raise  # the others are stuck in a collective: torchrun stops them when this process exits
    except BaseException:
        group.broadcast_json({"op": "stop"})
        raise
    group.broadcast_json({"op": "stop"})
    group.close()
    return done
