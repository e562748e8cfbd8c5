"""Process 0 of a multi-process worker, in this process (a one-process gloo group): its trainer runs a
job through the real Worker loop, a failure every process shares gives the copy back and goes on,
and any other failure in training gives it back and stops the worker (the processes are out of step)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pum.client import fsdp_worker
from pum.client.api import WorkerAPI
from pum.client.fsdp import FsdpGroup
from pum.client.fsdp_worker import FsdpCopyTrainer
from pum.client.worker import FatalWorkerError, Worker, WorkerOptions
from pum.demo.cluster import free_port

torch.set_num_threads(1)

JOB = {"copies_m": 2, "rounds_R": 2, "inner_handler": "NPO", "local_max_steps": 2, "noise_kappa": 0.0,
       "jitter_tau": 0.0}


@pytest.fixture
def group(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    group = FsdpGroup.start("cpu")
    yield group
    group.close()


def run(server, job, trainer, forget, retain, tmp_path) -> Worker:
    options = WorkerOptions(saves_dir=tmp_path / "saves", progress=False)
    worker = Worker(WorkerAPI(server.worker(server.token(job))), forget, retain, options, sleep=lambda s: None,
                    trainer=trainer)
    worker.run()
    return worker


def test_the_sharded_trainer_runs_a_job_like_the_one_process_worker(server, model_dir, group, forget_pairs,
                                                                    retain_pairs, tmp_path):
    merged = []
    for name, trainer in (("sharded", FsdpCopyTrainer(group, forget_pairs, retain_pairs)), ("one", None)):
        job = server.create_job(model_dir, JOB, task=name, hyperparams={"lr": 1e-3, "batch_size": 4})
        worker = run(server, job, trainer, forget_pairs, retain_pairs, tmp_path / name)
        assert worker.done == 4 and worker.failed == 0
        merged.append(load_file(f"{server.admin.get(f'/v1/jobs/{job}').json()['output_dir']}/model.safetensors"))
    assert max((merged[0][k] - merged[1][k]).abs().max().item() for k in merged[0]) < 1e-6


def test_a_failure_every_process_shares_gives_the_copy_back_and_goes_on(server, model_dir, group, forget_pairs,
                                                                         retain_pairs, tmp_path, monkeypatch):
    def diverge(*args, **kwargs):
        raise FloatingPointError("NPO loss is nan at step 1 of 2: lower lr")

    monkeypatch.setattr(fsdp_worker, "run_unlearning", diverge)
    job = server.create_job(model_dir, JOB, hyperparams={"lr": 1e-3, "batch_size": 4})
    with pytest.raises(RuntimeError, match="3 copies failed in a row"):
        run(server, job, FsdpCopyTrainer(group, forget_pairs, retain_pairs), forget_pairs, retain_pairs, tmp_path)
    copies = server.admin.get(f"/v1/jobs/{job}").json()["rounds"][0]["copies"]
    assert sum(c["failures"] for c in copies) == 3 and all(c["state"] == "pending" for c in copies)


def test_any_other_failure_in_training_gives_the_copy_back_and_stops_the_worker(server, model_dir, group, forget_pairs,
                                                                                 retain_pairs, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(fsdp_worker, "full_tensors", broken)
    job = server.create_job(model_dir, JOB, hyperparams={"lr": 1e-3, "batch_size": 4})
    with pytest.raises(FatalWorkerError, match="out of step after RuntimeError: CUDA out of memory"):
        run(server, job, FsdpCopyTrainer(group, forget_pairs, retain_pairs), forget_pairs, retain_pairs, tmp_path)
    copies = server.admin.get(f"/v1/jobs/{job}").json()["rounds"][0]["copies"]
    assert sum(c["failures"] for c in copies) == 1 and all(c["state"] == "pending" for c in copies)  # given back once


def test_what_only_process_0_can_check_fails_before_the_others_hear_of_the_copy(
        server, model_dir, group, forget_pairs, retain_pairs, tmp_path, monkeypatch):
    sent = []
    monkeypatch.setattr(group, "broadcast_json", lambda message=None: sent.append(message))
    trainer = FsdpCopyTrainer(group, forget_pairs, None)  # NPO needs a retain set: refused on process 0 alone
    job = server.create_job(model_dir, JOB, hyperparams={"lr": 1e-3, "batch_size": 4})
    with pytest.raises(RuntimeError, match="3 copies failed in a row"):
        run(server, job, trainer, forget_pairs, None, tmp_path)
    assert sent == []
