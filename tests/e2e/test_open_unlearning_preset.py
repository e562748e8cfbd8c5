"""Real processes: `pum admin create presets/tofu/NPO.yaml --set model_dir=ID` (open-unlearning's names, a model
id the server resolves from its Hugging Face cache) runs to the end with two `pum worker` processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pum.client.admin import AdminAPI
from pum.client.cli import http_client
from pum.demo.assets import tiny_assets
from pum.demo.cluster import LocalServer, start_worker

pytestmark = pytest.mark.e2e
PRESET = Path(__file__).resolve().parents[2] / "presets" / "tofu" / "NPO.yaml"


def test_npo_preset_with_open_unlearning_names_runs_end_to_end(tmp_path, hf_cache, job_runner):
    from transformers import AutoModelForCausalLM

    assets = tiny_assets(tmp_path / "assets")
    hf_cache.fill(assets.model_dir, "open-unlearning/tofu_tiny_full")
    saves = tmp_path / "saves"
    server = LocalServer(state_dir=tmp_path / "state", saves_dir=saves, log_path=tmp_path / "server.log",
                         extra_env={"HF_HUB_CACHE": str(hf_cache.path), "HF_HUB_OFFLINE": "1"})
    with server, http_client(server.url, server.admin_token) as http:
        created = subprocess.run(
            [sys.executable, "-m", "pum.cli", "--log-level", "WARNING", "admin", "--server", server.url, "--token",
             server.admin_token, "create", str(PRESET), "--set", "model_dir=open-unlearning/tofu_tiny_full",
             "--set", "task=tofu_tiny_NPO"],
            capture_output=True, text=True, timeout=120)
        assert created.returncode == 0, created.stderr
        job = json.loads(created.stdout)["id"]
        admin = AdminAPI(http)
        status = admin.status(job)
        # open-unlearning's names arrived as PUM's; the preset's rounds and epochs are the job's
        assert status.hyperparams == {"lr": 1e-5, "weight_decay": 0.01, "warmup_epochs": 1.0, "batch_size": 32,
                                         "gradient_accumulation_steps": 4,  # 4 passes of 8, as in open-unlearning
                                         "schedule": "linear", "optimizer": "adamw", "seed": 0, "beta": 0.1,
                                         "alpha": 1.0, "gamma": 1.0, "retain_loss": "nll"}
        assert (status.settings["inner_handler"], status.rounds_R, status.settings["local_epochs"]) == ("NPO", 2, 10)
        workers = [start_worker(server.url, admin.issue_token(job, f"w{i}"), assets.split("forget10"),
                                assets.split("retain90"), saves, log_path=tmp_path / f"worker{i}.log") for i in range(2)]
        status, exit_codes, logs = job_runner(admin, job, workers, tmp_path, timeout_s=300)
        assert status.state == "finalized" and exit_codes == [0, 0], logs[-3000:]
        assert [r.accepted for r in status.rounds] == [4, 4]
        merged = AutoModelForCausalLM.from_pretrained(admin.download_model(job, tmp_path / "merged"))
    original = assets.load_model()
    assert any(not torch.equal(t, original.state_dict()[n]) for n, t in merged.state_dict().items())
    rows = [json.loads(line) for d in sorted((saves / "tofu_tiny_NPO").glob("pum_round1_copy*"))
            for line in (d / "train_log.jsonl").read_text().splitlines()]
    assert rows and max(row["lr"] for row in rows) <= 1e-5  # the preset's learning rate, warmed up
