"""DP calibration in the server, the privacy report endpoint, the per-token copy cap, `pum privacy`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save

from pum.cli import main
from pum.common.privacy.report import NO_PUBLIC_BASE, ZERO_SUM_SMALL_TAU


@pytest.fixture
def base_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def dp_job(server, model_dir, base_dir, **pum):
    settings = {"copies_m": 4, "rounds_R": 2, "dp_epsilon": 4.0, "base_model": str(base_dir),
                "center_clip_C_per_layer": 0.5, "center_clip_C_global": 0.5, "dp_alpha_policy": "realized", **pum}
    return server.create_job(model_dir, settings)


def finish_round(server, job: str) -> None:
    worker = server.worker(server.token(job, "finisher"))
    while (reply := worker.post("/v1/work/lease").json())["status"] == "leased":
        copy = load(worker.get(f"/v1/work/leases/{reply['lease_id']}/copy").content)
        worker.put(f"/v1/work/leases/{reply['lease_id']}/delta", content=save({n: torch.zeros(t.shape) for n, t in copy.items()}))
        if server.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized":
            return


def test_calibrated_job_meets_its_epsilon_over_all_rounds(server, tiny_model_dir, base_dir):
    job = dp_job(server, tiny_model_dir, base_dir, noise_structure="independent")
    finish_round(server, job)
    report = server.admin.get(f"/v1/jobs/{job}/privacy").json()
    assert report["rounds"] == 2 and report["meaningful"]
    assert 3.99 <= report["seed_formula"]["epsilon"] <= 4.0 + 1e-9  # tight, never over
    # independent copies: the release is exactly the mechanism the formula assumes (exact conversion is tighter)
    assert report["true_release"]["mu"] == pytest.approx(report["seed_formula"]["mu"], rel=1e-9)
    assert report["true_release"]["epsilon"] <= report["seed_formula"]["epsilon"]
    sigmas = report["sigmas"][1]
    assert set(sigmas) == {"layer.0", "layer.1", "global"} and all(s > 0 for s in sigmas.values())


def test_zero_sum_without_jitter_is_reported_as_no_guarantee(server, tiny_model_dir, base_dir):
    report = server.admin.get(f"/v1/jobs/{dp_job(server, tiny_model_dir, base_dir)}/privacy").json()
    assert report["seed_formula"]["epsilon"] <= 4.0 + 1e-9
    assert report["true_release"]["epsilon"] in (None, float("inf")) or report["true_release"]["epsilon"] > 1e6
    assert ZERO_SUM_SMALL_TAU in report["warnings"]


def test_without_a_public_base_no_epsilon_is_claimed(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "center_clip_C_per_layer": 0.5, "center_clip_C_global": 1.0})
    report = server.admin.get(f"/v1/jobs/{job}/privacy").json()
    assert NO_PUBLIC_BASE in report["warnings"] and report["seed_formula"]["epsilon"] is None


def test_per_token_copy_cap_limits_a_coalition(server, tiny_model_dir, base_dir):
    job = dp_job(server, tiny_model_dir, base_dir, per_token_copy_cap=2, jitter_tau=0.5)
    greedy = server.worker(server.token(job, "greedy"))
    assert [greedy.post("/v1/work/lease").json()["status"] for _ in range(3)] == ["leased", "leased", "wait"]
    report = server.admin.get(f"/v1/jobs/{job}/privacy").json()
    assert report["largest_coalition"]["copies"] == 2 and report["largest_coalition"]["source"] == "observed"
    assert report["largest_coalition"]["epsilon"] < report["true_release"]["epsilon"]


def test_privacy_cli_reports_a_job_file(tmp_path, tiny_model_dir, base_dir, capsys):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        f"task: p\nmodel_dir: {tiny_model_dir}\npum:\n  copies_m: 3\n  dp_epsilon: 8\n  base_model: {base_dir}\n"
        "  center_clip_C_per_layer: 1.0\n  center_clip_C_global: 1.0\n  noise_structure: independent\n"
    )
    assert main(["privacy", str(job_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["copies_m"] == 3 and report["seed_formula"]["epsilon"] <= 8.0 + 1e-9
