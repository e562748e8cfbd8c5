"""Job lifecycle over HTTP: creation checks, start/pause/resume/abort/advance/finalize, restart."""

from __future__ import annotations

import torch
from safetensors.torch import load, save


def upload_all(server, job: str, worker, n: int, value: float = 0.01) -> None:
    for _ in range(n):
        lease = worker.post("/v1/work/lease").json()["lease_id"]
        copy = load(worker.get(f"/v1/work/leases/{lease}/copy").content)
        response = worker.put(f"/v1/work/leases/{lease}/delta", content=save({k: torch.full(v.shape, value) for k, v in copy.items()}))
        assert response.status_code == 200, response.text


def test_creation_refuses_bad_specs_with_a_message(server, tiny_model_dir, tmp_path):
    cases = [
        ({"task": "../x", "model_dir": str(tiny_model_dir)}, "task"),
        ({"task": "t", "model_dir": str(tmp_path / "nope")}, "model_dir"),
        ({"task": "t", "model_dir": str(tmp_path)}, "config.json"),
        ({"task": "t", "model_dir": str(tiny_model_dir), "pum": {"copies_m": 1}}, "copies_m must be in [2, 64]"),
        ({"task": "t", "model_dir": str(tiny_model_dir), "pum": {"dp_epsilon": 4}}, "dp_epsilon needs center clipping"),
        ({"task": "t", "model_dir": str(tiny_model_dir), "pum": {"copies": 3}}, "copies_m"),
    ]
    for body, phrase in cases:
        response = server.admin.post("/v1/jobs", json=body)
        assert response.status_code == 400, (body, response.text)
        assert phrase in response.json()["detail"], (phrase, response.json())
    assert server.admin.get("/v1/jobs").json() == []
    assert not list(server.settings.state_dir.glob("jobs/*"))


def test_reparameterization_of_an_architecture_without_adapter_is_refused(server, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    body = {"task": "t", "model_dir": str(tmp_path / "gpt2"), "pum": {"use_orthogonal_reparam": True}}
    response = server.admin.post("/v1/jobs", json=body)
    assert response.status_code == 400 and "GPT2LMHeadModel" in response.json()["detail"]
    assert server.admin.get("/v1/jobs").json() == []


def test_pause_resume_abort(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 2})
    worker = server.worker(server.token(job))
    assert server.admin.post(f"/v1/jobs/{job}/pause").json()["state"] == "paused"
    assert worker.post("/v1/work/lease").json()["status"] == "wait"
    assert server.admin.post(f"/v1/jobs/{job}/pause").status_code == 409
    assert server.admin.post(f"/v1/jobs/{job}/resume").json()["state"] == "running"
    lease = worker.post("/v1/work/lease").json()["lease_id"]
    assert server.admin.post(f"/v1/jobs/{job}/abort").json()["state"] == "aborted"
    assert worker.post("/v1/work/lease").json() == {"status": "done", "job_state": "aborted"}
    assert worker.put(f"/v1/work/leases/{lease}/delta", content=b"").status_code == 410
    assert server.admin.post(f"/v1/jobs/{job}/start").status_code == 409


def test_manual_advance_waits_for_the_admin(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 2, "auto_advance": False})
    worker = server.worker(server.token(job))
    upload_all(server, job, worker, 1)
    assert server.admin.post(f"/v1/jobs/{job}/advance").status_code == 409  # 1 of 2 copies
    upload_all(server, job, worker, 1)
    assert worker.post("/v1/work/lease").json()["status"] == "wait"
    assert server.admin.get(f"/v1/jobs/{job}").json()["round"] == 1
    assert server.admin.post(f"/v1/jobs/{job}/advance").json()["round"] == 2
    upload_all(server, job, worker, 2)
    final = server.admin.post(f"/v1/jobs/{job}/advance").json()
    assert final["state"] == "finalized"


def test_finalize_early_saves_the_last_completed_round(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 3})
    worker = server.worker(server.token(job))
    upload_all(server, job, worker, 2, value=0.5)  # round 1 complete
    upload_all(server, job, worker, 1, value=9.0)  # half of round 2: discarded
    status = server.admin.post(f"/v1/jobs/{job}/finalize").json()
    assert status["state"] == "finalized"
    files = server.admin.get(f"/v1/jobs/{job}/model").json()["files"]
    assert "model.safetensors" in files and "config.json" in files
    merged = load(server.admin.get(f"/v1/jobs/{job}/model/model.safetensors").content)
    before = load((tiny_model_dir / "model.safetensors").read_bytes())
    for name, tensor in before.items():
        torch.testing.assert_close(merged[name], tensor + 0.5, rtol=0, atol=1e-6)


def test_model_download_before_finalize_is_refused(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 2})
    response = server.admin.get(f"/v1/jobs/{job}/model")
    assert response.status_code == 409 and "finalized" in response.json()["detail"]
    assert server.admin.get("/v1/jobs/job-nope").status_code == 404


def test_status_lists_copies_with_timings(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 3})
    worker = server.worker(server.token(job))
    upload_all(server, job, worker, 1)
    worker.post("/v1/work/lease")
    status = server.admin.get(f"/v1/jobs/{job}").json()
    copies = status["rounds"][0]["copies"]
    assert sorted(c["state"] for c in copies) == ["accepted", "leased", "pending"]  # copies are granted at random
    accepted = next(c for c in copies if c["state"] == "accepted")
    assert accepted["accepted_at"] >= accepted["leased_at"]


def test_a_restarted_server_continues_the_round(tmp_path, tiny_model_dir, server_factory):
    first = server_factory(tmp_path)
    job = first.create_job(tiny_model_dir, {"copies_m": 3, "rounds_R": 1})
    token = first.token(job)
    upload_all(first, job, first.worker(token), 2)
    first.service.store.close()

    second = server_factory(tmp_path)  # same state folder, new process state
    status = second.admin.get(f"/v1/jobs/{job}").json()
    assert status["rounds"][0]["accepted"] == 2
    upload_all(second, job, second.worker(token), 1)
    assert second.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized"


def test_secrets_on_disk_are_private(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 2})
    state = server.settings.state_dir
    files = {p.relative_to(state).as_posix(): p.stat().st_mode for p in state.rglob("*") if p.is_file()}
    assert {f"jobs/{job}/secret.key", f"jobs/{job}/rounds/r1/zbar.safetensors", "state.db"} <= set(files)
    assert {name: oct(mode) for name, mode in files.items() if mode & 0o077} == {}
