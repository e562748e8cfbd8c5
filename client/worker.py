"""The worker loop: lease a copy, download it, unlearn locally, upload the delta, repeat.

A worker holds the forget set (and optionally a retain set) and never sends it; it sends only
Δ = (trained copy − received copy) in float32. A failure on one copy is reported to the server
(the copy is offered again) and the loop goes on. The training itself is `Worker.train_copy`
(one process) or a `CopyTrainer` passed in (`pum.client.fsdp_worker`: one copy on several GPUs).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from tqdm import tqdm

from pum.common.codec import SafetensorsFile, TensorInfo, save_file_atomic
from pum.common.errors import PumError
from pum.common.prompts import QAEncoder
from pum.common.qa import QAPair
from pum.common.schemas import LeaseDone, LeaseGranted, LeaseWait, TaskSpec, UploadKind

from .api import WorkerAPI
from .carry import CarryStore, carried_for_copy
from .disk import check_copy_space
from .lease_checks import (
    MAX_PUBLIC_FILE_BYTES, RefusedLease, check_lease, check_served_files, is_lease_id, load_served_model, read_copy,
)
from .progress import byte_bar, set_total
from .trainer import TrainConfig, run_unlearning

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    saves_dir: Path = Path("saves/unlearn")  # per-copy folders go under saves_dir/<task>/
    device: str | None = None  # None: the GPU when there is one, else the CPU
    progress: bool = True  # progress bars for download, training and upload
    max_copies: int | None = None  # stop after this many copies (None: until the job ends)
    poll_s: float = 1.0  # longest wait between lease requests when the server says 'wait'
    idk_answers: tuple[str, ...] | None = None  # "I don't know" lines for DPO (None: TOFU's list)
    max_consecutive_failures: int = 3  # a worker that fails this often in a row stops (it is broken, not unlucky)
    carry_dir: Path | None = None  # the reference and optimiser state carried across rounds (None: saves_dir/carry);
    # workers of one data owner may share it (pum.client.carry)
    bf16_delta: bool = False  # upload Δ in bfloat16: half the bytes, ~0.2 % relative error of Δ (bench/upload_dtype.py)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class ReceivedCopy:
    """A downloaded copy, ready to train: what a `CopyTrainer` gets."""

    folder: Path  # the served config and tokenizer files (checked), and model.safetensors
    received: dict[str, torch.Tensor]  # the copy's tensors (file-backed)
    task: TaskSpec  # as the server sent it
    config: TrainConfig  # TrainConfig.from_task(task, round)
    round: int
    store: CarryStore  # the job's carried reference and optimiser state
    log: Callable[[dict], None]  # one call per training step

    @property
    def file(self) -> Path:
        return self.folder / "model.safetensors"


class CopyTrainer(Protocol):
    def __call__(self, copy: ReceivedCopy, delta_path: Path) -> dict:
        """Train `copy`, keep what the next round carries, write Δ to `delta_path`; the training metrics."""


class FatalWorkerError(Exception):
    """This worker cannot go on (its training processes are out of step): give the lease back and stop."""


class Worker:
    def __init__(
        self, api: WorkerAPI, forget: list[QAPair], retain: list[QAPair] | None,
        options: WorkerOptions = WorkerOptions(), sleep: Callable[[float], None] = time.sleep,
        trainer: CopyTrainer | None = None,
    ):
        self.api = api
        self.forget = forget
        self.retain = retain
        self.options = options
        self.device = options.device or default_device()
        self.sleep = sleep
        self.trainer = trainer or self.train_copy
        self.done = 0
        self.failed = 0
        self._failed_in_a_row = 0
        self._carry_stores: dict[Path, CarryStore] = {}  # of the jobs this worker has worked on

    def run(self) -> int:
        """Work until the job ends (or max_copies); returns the number of copies uploaded."""
        while self.options.max_copies is None or self.done < self.options.max_copies:
            reply = self.api.lease()
            if isinstance(reply, LeaseDone):
                log.info("job is %s: worker stops after %d copies", reply.job_state, self.done)
                for store in self._carry_stores.values():
                    store.remove()  # the job has ended: nothing more to carry
                break
            if isinstance(reply, LeaseWait):
                self.sleep(min(reply.retry_after_s, self.options.poll_s))
                continue
            try:
                self.process(reply)
                self.done += 1
                self._failed_in_a_row = 0
            except FatalWorkerError as err:
                self._give_back(reply.lease_id, f"{type(err).__name__}: {err}")
                raise
            except Exception as err:  # whatever went wrong, the copy goes back to the pool now
                self._count_failure()
                if isinstance(err, (PumError, RefusedLease)):  # a refusal by either side: its message says it all
                    log.warning("copy of lease %.40r failed, giving it back: %s", reply.lease_id, err,
                                extra={"lease": reply.lease_id[:40], "reason": type(err).__name__})
                else:
                    log.exception("copy of lease %.40r failed; giving it back", reply.lease_id,
                                  extra={"lease": reply.lease_id[:40], "reason": type(err).__name__})
                self._give_back(reply.lease_id, f"{type(err).__name__}: {err}")
            if self._failed_in_a_row >= self.options.max_consecutive_failures:
                raise RuntimeError(f"worker stops: {self._failed_in_a_row} copies failed in a row (see the log above)")
        return self.done

    def process(self, reply: LeaseGranted) -> dict:
        """One copy from lease to accepted upload; returns the copy's metrics.

        The lease is checked before anything is written, the served files before the copy is
        downloaded, and the copy before the model is built (see `lease_checks`).
        """
        lease = check_lease(reply)
        config = TrainConfig.from_task(lease.task, round_=lease.round)
        store = CarryStore.for_job(self.options.carry_dir or self.options.saves_dir / "carry", lease.task_name,
                                   lease.job_id)
        self._carry_stores[store.root] = store
        with tempfile.TemporaryDirectory(prefix="pum-copy-") as tmp, _Heartbeat(self.api, lease.id, lease.ttl_s):
            workdir = Path(tmp)
            started = time.perf_counter()
            for name in lease.public_files:
                self.api.public_file(name, workdir / name, MAX_PUBLIC_FILE_BYTES)
            check_served_files(workdir)
            with self._bar("download") as bar:
                self.api.download_copy(lease.id, workdir / "model.safetensors", bar.update,
                                       partial(self._before_copy, bar, workdir))
            downloaded = time.perf_counter()
            received = read_copy(workdir / "model.safetensors")
            copy_dir = self._copy_dir(lease.task_name, lease.round)
            delta_path = workdir / "delta.safetensors"
            with (copy_dir / "train_log.jsonl").open("w") as metrics_log:
                copy = ReceivedCopy(workdir, received, lease.task, config, lease.round, store,
                                    lambda row: metrics_log.write(json.dumps(row) + "\n"))
                train = self.trainer(copy, delta_path)
            kind = UploadKind.DELTA
            if self.options.bf16_delta:
                delta_path, kind = to_bf16(delta_path, workdir / "delta-bf16.safetensors"), UploadKind.DELTA_BF16
            trained = time.perf_counter()
            delta_bytes = delta_path.stat().st_size
            with self._bar("upload", delta_bytes) as bar:
                result = self.api.upload_delta(lease.id, delta_path, bar.update, kind)
        metrics = {
            "round": lease.round, "task": lease.task_name, "method": lease.task.method, "train": train,
            "seconds": {"download": downloaded - started, "train": trained - downloaded, "upload": time.perf_counter() - trained},
            "server": result.model_dump(mode="json"),
        }
        (copy_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("round %d copy done in %s: %s", lease.round, copy_dir.name, metrics["seconds"],
                 extra={"job": reply.job_id, "round": lease.round, "lease": lease.id,
                        "seconds": sum(metrics["seconds"].values()), "bytes": delta_bytes})
        return metrics

    def train_copy(self, copy: ReceivedCopy, delta_path: Path) -> dict:
        """The one-process `CopyTrainer`: the whole model on this worker's device."""
        model, tokenizer = load_served_model(copy.folder, self.device, copy.received)
        tokenizer = QAEncoder(tokenizer, copy.task.prompt_format)  # the job's prompt format for every batch
        carried = carried_for_copy(copy.store, copy.config, model, copy.file, copy.round)
        train = run_unlearning(
            model, tokenizer, self.forget, self.retain, copy.config, carried=carried,
            progress=self.options.progress, log=copy.log, idk_answers=self.options.idk_answers,
        )
        if copy.config.carry_optimizer:
            # Before the upload: the upload that completes the round lets round r + 1 start at once.
            copy.store.save_optimizer_state(copy.round, carried.optimizer_state or {})
        _write_delta(model.state_dict(), copy.received, delta_path)
        return train

    def _copy_dir(self, task: str, round_: int) -> Path:
        """saves/unlearn/<task>/pum_round{r}_copy{k}: k counts this machine's copies of the round."""
        base = self.options.saves_dir / task
        base.mkdir(parents=True, exist_ok=True)
        k = 0
        while True:
            path = base / f"pum_round{round_}_copy{k}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                k += 1

    def _count_failure(self) -> None:
        self.failed += 1
        self._failed_in_a_row += 1

    def _give_back(self, lease_id: object, reason: str) -> None:
        if not is_lease_id(lease_id):  # never put a hostile id into a URL path
            log.warning("cannot give back a lease with id %.40r", lease_id)
            return
        try:
            self.api.release(lease_id, reason)
        except Exception as err:  # the lease will expire on its own
            log.warning("could not give back %s: %s", lease_id, err)

    @staticmethod
    def _before_copy(bar: tqdm, workdir: Path, size: int) -> None:
        """Once the copy's size is known, before its first byte: room for it and its Δ, and the bar's total."""
        check_copy_space(workdir, size)
        set_total(bar, size)

    def _bar(self, desc: str, total: int | None = None) -> tqdm:
        """A byte bar with total and ETA; a download's total comes with its Content-Length."""
        return byte_bar(desc, total, enabled=self.options.progress)


def _write_delta(state: dict[str, torch.Tensor], received: dict[str, torch.Tensor], path: Path) -> None:
    """Δ = trained − received for every tensor of the copy, in float32 (upcast before subtracting)."""
    missing = sorted(set(received) - set(state))
    if missing:
        raise ValueError(f"the trained model lacks tensors of the copy: {missing[:5]}")
    write_delta(received, (state[name] for name in received), path)


def write_delta(received: dict[str, torch.Tensor], trained: Iterator[torch.Tensor], path: Path) -> None:
    """Δ = trained − received, tensor by tensor in `received`'s order (`trained` yields them so), in float32."""
    infos = [TensorInfo(name, "F32", tuple(t.shape)) for name, t in received.items()]
    deltas = (t.detach().to("cpu", torch.float32) - received[i.name].to(torch.float32) for i, t in zip(infos, trained))
    save_file_atomic(path, infos, deltas)


def to_bf16(path: Path, target: Path) -> Path:
    """The float32 delta file at `path` rewritten in bfloat16 at `target` (tensor by tensor); removes `path`."""
    with SafetensorsFile(path) as delta:
        infos = [TensorInfo(i.name, "BF16", i.shape) for i in delta.infos]
        save_file_atomic(target, infos, (delta.read(i.name).to(torch.bfloat16) for i in infos))
    path.unlink()
    return target


class _Heartbeat:
    """Renews the lease every ttl/3 seconds while the copy is being worked on."""

    def __init__(self, api: WorkerAPI, lease_id: str, ttl_s: float):
        self.api, self.lease_id, self.period = api, lease_id, max(ttl_s / 3.0, 0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{lease_id[:12]}")

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.api.heartbeat(self.lease_id)
            except Exception as err:
                log.warning("heartbeat for %s failed: %s", self.lease_id, err)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
