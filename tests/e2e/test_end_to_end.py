"""Real processes on loopback: `pum server` under uvicorn and two `pum worker` processes.

The job runs GradDiff on the tiny demo assets with m = 3, R = 2 and must finalize with every
copy of both rounds accepted, a model that loads, and per-copy folders with metrics.
"""

from __future__ import annotations

import json

import pytest
import torch

from pum.client.admin import AdminAPI
from pum.client.cli import http_client
from pum.common.qa import mean_answer_probability
from pum.common.states import CopyState, JobState
from pum.demo.cluster import LocalServer, start_worker

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def assets(demo_assets):
    return demo_assets[1]


def test_job_with_two_worker_processes_completes(tmp_path, assets, job_runner):
    from transformers import AutoModelForCausalLM

    saves = tmp_path / "saves"
    server = LocalServer(state_dir=tmp_path / "state", saves_dir=saves, log_path=tmp_path / "server.log")
    with server, http_client(server.url, server.admin_token) as http:
        admin = AdminAPI(http)
        pum = {"copies_m": 3, "rounds_R": 2, "noise_kappa": 0.01, "inner_handler": "GradDiff", "local_max_steps": 3}
        job = admin.create_job("e2e", str(assets.model_dir), pum, {"lr": 1e-3, "batch_size": 8}).id
        workers = [
            start_worker(server.url, admin.issue_token(job, f"w{i}"), assets.split("forget10"),
                         assets.split("retain90"), saves, log_path=tmp_path / f"worker{i}.log")
            for i in range(2)
        ]
        status, exit_codes, logs = job_runner(admin, job, workers, tmp_path)
        assert status.state is JobState.FINALIZED, logs[-3000:]
        assert exit_codes == [0, 0], logs[-3000:]
        assert [r.accepted for r in status.rounds] == [3, 3]
        assert all(c.state is CopyState.ACCEPTED for r in status.rounds for c in r.copies)
        model_dir = admin.download_model(job, tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    original = assets.load_model()
    changed = [n for n, t in merged.state_dict().items() if not torch.equal(t, original.state_dict()[n])]
    assert changed, "the merged model equals the original: no update was applied"
    tokenizer = assets.load_tokenizer()
    forget = assets.pairs("forget10")
    assert mean_answer_probability(merged, tokenizer, forget) < mean_answer_probability(original, tokenizer, forget)

    copy_dirs = sorted((saves / "e2e").glob("pum_round*_copy*"))
    assert len(copy_dirs) == 6  # 3 copies × 2 rounds across the two workers
    metrics = json.loads((copy_dirs[0] / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3 and metrics["server"]["accepted"] is True
    assert not list((saves / "e2e").glob("pum_round*_copy*/*.safetensors"))  # logs and metrics, no checkpoints
