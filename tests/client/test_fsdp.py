"""FSDP2 on two CPU processes (gloo, under torchrun) trains a copy as one process does: the gathered
weights and the full optimiser state equal single-process training to float tolerance, with a
reference model (NPO, DPO), with AdamW carried in from a one-process round and out to the next,
with accumulation on top of the data-parallel split, and with gradient checkpointing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pum.client.carry import CarryStore
from pum.client.methods import frozen_reference
from pum.client.trainer import Carried, TrainConfig, run_unlearning

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).with_name("fsdp_train.py")
UPDATE_TOLERANCE = 5e-5  # ‖FSDP − one process‖/‖one process − start‖ per tensor, AdamW (see test_step_mechanics)


def run_torchrun(runs: list[dict], tmp_path: Path, nproc: int = 2) -> None:
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(SCRIPT), str(spec)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def write_pairs(path: Path, pairs) -> str:
    path.write_text("\n".join(json.dumps({"question": p.question, "answer": p.answer}) for p in pairs))
    return str(path)


def save_model(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def one_process(model, tokenizer, forget, retain, config: TrainConfig, optimizer_state=None):
    carried = Carried(reference=frozen_reference(model), optimizer_state=optimizer_state)
    run_unlearning(model, tokenizer, forget, retain, config, carried=carried)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, carried.optimizer_state


def as_json(config: TrainConfig) -> dict:
    return {f.name: dict(getattr(config, f.name)) if f.name == "params" else getattr(config, f.name)
            for f in dataclasses.fields(config)}


def gaps(got: dict, expected: dict, start: dict) -> tuple[float, float]:
    """(max |got − expected|, max over tensors of ‖got − expected‖/‖expected − start‖)."""
    absolute = max((got[k] - expected[k]).abs().max().item() for k in got)
    relative = max(((got[k] - expected[k]).norm() / (expected[k] - start[k]).norm()).item()
                   for k in got if (expected[k] - start[k]).norm() > 1e-9)
    return absolute, relative


def test_two_fsdp_processes_train_as_one(tmp_path, make_learned_model, tokenizer, forget_pairs, retain_pairs):
    forget, retain = write_pairs(tmp_path / "forget.jsonl", forget_pairs), write_pairs(tmp_path / "retain.jsonl",
                                                                                         retain_pairs)
    start_dir = save_model(make_learned_model(), tokenizer, tmp_path / "start")
    graddiff = TrainConfig(method="GradDiff", lr=1e-2, batch_size=4, max_steps=3, seed=3, max_grad_norm=0.5)
    dpo_sgd = TrainConfig(method="DPO", optimizer="sgd", lr=0.5, batch_size=4, max_steps=3, seed=3,
                          weight_decay=0.0)
    # NPO round 2 of 2 from a one-process round 1 (its weights and AdamW state), with 2 passes per process:
    # batches of 4 and 2 rows in 2 × 2 slots (stand-ins in the second).
    npo = TrainConfig(method="NPO", lr=1e-2, batch_size=4, max_steps=2, rounds=2, seed=3, schedule="linear",
                      warmup_steps=1)
    round1_model = make_learned_model()
    _, round1_state = one_process(round1_model, tokenizer, forget_pairs, retain_pairs, npo)
    round1_dir = save_model(round1_model, tokenizer, tmp_path / "round1")
    CarryStore(tmp_path / "carry1").save_optimizer_state(1, round1_state)
    npo2 = dataclasses.replace(npo, round=2, gradient_accumulation_steps=2)
    configs = {"graddiff": (start_dir, dataclasses.replace(graddiff, gradient_checkpointing=True), None),
               "dpo_sgd": (start_dir, dpo_sgd, None),
               "npo_round2": (round1_dir, npo2, str(tmp_path / "carry1"))}
    run_torchrun([{"model": model, "forget": forget, "retain": retain, "config": as_json(config),
                   "out": str(tmp_path / name), "state_in": state} for name, (model, config, state) in configs.items()],
                 tmp_path)

    start = make_learned_model().state_dict()
    expected, _ = one_process(make_learned_model(), tokenizer, forget_pairs, retain_pairs, graddiff)
    absolute, relative = gaps(load_file(tmp_path / "graddiff" / "trained.safetensors"), expected, start)
    assert relative < UPDATE_TOLERANCE and absolute < 1e-4, (absolute, relative)

    expected, _ = one_process(make_learned_model(), tokenizer, forget_pairs, retain_pairs, dpo_sgd)
    absolute, _ = gaps(load_file(tmp_path / "dpo_sgd" / "trained.safetensors"), expected, start)
    assert absolute < 1e-6  # SGD: no amplification of float rounding

    # Round 2 in one process, from the same round-1 weights and state, with the same reference (the model as given).
    round2_model = make_learned_model()
    round2_model.load_state_dict(round1_model.state_dict())
    carried = Carried(optimizer_state=round1_state)
    run_unlearning(round2_model, tokenizer, forget_pairs, retain_pairs, dataclasses.replace(npo, round=2),
                   carried=carried)
    absolute, relative = gaps(load_file(tmp_path / "npo_round2" / "trained.safetensors"), round2_model.state_dict(),
                              round1_model.state_dict())
    assert relative < UPDATE_TOLERANCE and absolute < 1e-4, (absolute, relative)
    state = CarryStore(tmp_path / "npo_round2").load_optimizer_state(2)
    assert set(state) == set(carried.optimizer_state)  # full form, keyed like one process's: a later round may run on one
    for index, values in carried.optimizer_state.items():
        assert state[index]["step"].item() == values["step"].item() == 4
        assert torch.allclose(state[index]["exp_avg_sq"], values["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    assert json.loads((tmp_path / "npo_round2" / "metrics.json").read_text())["world"] == 2


def test_pum_worker_on_two_processes_keeps_the_kappa_zero_law(tmp_path, make_learned_model, tokenizer, forget_pairs,
                                                              retain_pairs, serve_app):
    """`pum worker --nproc-per-node 2` against a real server (uvicorn on 127.0.0.1): with κ = 0 and no
    reparameterization, PUM's merged model is the one-process baseline (DESIGN.md §6), through process 0's
    lease, download, broadcast, sharded training with the carried reference and AdamW state, gather and upload."""
    from transformers import AutoModelForCausalLM

    from pum.client.admin import AdminAPI
    from pum.client.cli import http_client
    from pum.common.schemas import TaskSpec
    from pum.demo.cluster import PUM
    from pum.server.config import ServerSettings

    model_dir = Path(save_model(make_learned_model(), tokenizer, tmp_path / "model"))
    forget, retain = write_pairs(tmp_path / "forget.jsonl", forget_pairs), write_pairs(tmp_path / "retain.jsonl",
                                                                                         retain_pairs)
    hyper = {"lr": 1e-2, "batch_size": 4, "seed": 3, "schedule": "linear", "warmup_steps": 2,
             "gradient_accumulation_steps": 2}
    pum = {"copies_m": 2, "rounds_R": 2, "inner_handler": "NPO", "local_epochs": 3.5, "noise_kappa": 0.0,
           "jitter_tau": 0.0, "use_orthogonal_reparam": False, "seed": 7}
    settings = ServerSettings(state_dir=tmp_path / "state", saves_dir=tmp_path / "out", admin_token="fsdp-admin",
                              dev_mode=True)  # a seeded job (dev only)
    with serve_app(settings) as url, http_client(url, "fsdp-admin") as http:
        admin = AdminAPI(http)
        job = admin.create_job("fsdp", str(model_dir), pum, hyper).id
        token = admin.issue_token(job, "w")
        admin.action(job, "start")
        command = [*PUM, "worker", "--server", url, "--token", token, "--forget", forget, "--retain", retain,
                   "--saves-dir", str(tmp_path / "saves"), "--device", "cpu", "--threads", "1", "--no-progress",
                   "--nproc-per-node", "2"]
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {"copies_uploaded": 4}
        assert admin.wait(job, timeout_s=60).state == "finalized"
        merged = load_file(admin.download_model(job, tmp_path / "merged") / "model.safetensors")

    baseline = AutoModelForCausalLM.from_pretrained(model_dir)
    task = TaskSpec(method="NPO", epochs=3.5, rounds=1, hyperparams={**hyper, "gradient_accumulation_steps": 1})
    run_unlearning(baseline, tokenizer, forget_pairs, retain_pairs, TrainConfig.from_task(task))
    absolute, relative = gaps(merged, baseline.state_dict(), load_file(model_dir / "model.safetensors"))
    assert relative < UPDATE_TOLERANCE, (absolute, relative)  # measured: 3.3e-6 (max |Δ| 2.8e-6)
    copies = sorted((tmp_path / "saves" / "fsdp").glob("pum_round*_copy*/metrics.json"))
    assert [json.loads(p.read_text())["train"]["processes"] for p in copies] == [2, 2, 2, 2]
