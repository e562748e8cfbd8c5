"""`pum audit` on real rounds: the strongest attacks (center-free, aligned under reparameterization)
reach the floor the accounting predicts; zero-sum noise without jitter gives the center away."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pum.cli import main
from pum.common.privacy.release import copy_covariance, ones_precision
from pum.server.audit import REPARAM_NOTE, audit_round


def relative_floor(server, job: str) -> dict[str, float]:
    """Per group: (1ᵀΣ⁻¹1)^(−1/2) over the per-copy noise RMS √(mean_k σ²α_k² + τ²), from the
    published σ_ℓ, τ and the seeded α (so the old report format can be checked too)."""
    status = server.admin.get(f"/v1/jobs/{job}").json()
    settings, sigmas = status["settings"], status["rounds"][0]["sigmas"]
    alphas, tau = server.alphas(job), settings["jitter_tau"]
    out = {}
    for group, sigma in sigmas.items():
        floor = ones_precision(copy_covariance(alphas, sigma, tau, settings["noise_structure"])) ** -0.5
        out[group] = floor / math.sqrt(np.mean([(sigma * a) ** 2 + tau**2 for a in alphas]))
    return out


# κ = 1: the min-variance attack's residual from the chance correlation of center and noise over n
# coordinates, ≈ (RMS(center)/σ)·√((m−1)/n), stays small even on this tiny model (n ≈ 2 k per group).
@pytest.mark.parametrize("pum, low, high", [
    ({"noise_structure": "zero_sum", "jitter_tau": 0.0}, 0.0, 0.06),
    ({"noise_structure": "independent"}, 0.3, 1.0),
])
def test_audit_recovery_error(server, tiny_model_dir, pum, low, high):
    job = server.create_job(tiny_model_dir, {"copies_m": 4, "noise_kappa": 1.0, **pum})
    report = audit_round(server.settings.state_dir, job)
    assert low <= report["smallest_relative_error"] <= high, report


def test_the_audit_runs_the_strongest_attack_and_reaches_the_floor(server, tiny_model_dir):
    # κ = 0.1 and a small jitter: the center is ~10 σ, so the min-variance weights are thrown off by
    # its chance correlation with the noise; the center-free fit does not see the center at all
    job = server.create_job(tiny_model_dir, {"copies_m": 4, "noise_kappa": 0.1, "jitter_tau": 1e-3})
    report = audit_round(server.settings.state_dir, job)
    for group, floor in relative_floor(server, job).items():
        result = report["groups"][group]
        assert result["relative_error"] <= 1.15 * floor, (group, result["relative_error"], floor)
        assert result["relative_error"] >= 0.85 * floor
    layer = report["groups"]["layer.0"]["runs"]["as_published"]["attacks"]
    assert layer["center_free"]["rmse"] < 0.5 * layer["min_variance"]["rmse"]


def test_reparameterization_hides_little_from_the_party_holding_every_copy(server, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # wide against its heads: hidden 128, d_h = 8
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, num_hidden_layers=1, num_attention_heads=16,
                                 num_key_value_heads=2, intermediate_size=256)).save_pretrained(tmp_path / "wide")
    job = server.create_job(tmp_path / "wide", {"copies_m": 4, "noise_kappa": 0.1, "use_orthogonal_reparam": True})
    report = audit_round(server.settings.state_dir, job)
    layer = report["groups"]["layer.0"]
    assert layer["relative_error"] < 0.1 and layer["strongest"].startswith("aligned/")
    assert layer["runs"]["as_published"]["relative_error"] > 0.5  # transformed copies against the plain center
    assert report["reparameterized"] and REPARAM_NOTE in report["notes"]


def test_audit_cli(server, tiny_model_dir, capsys):
    job = server.create_job(tiny_model_dir, {"copies_m": 3})
    assert main(["audit", job, "--state-dir", str(server.settings.state_dir), "--coords", "100"]) == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    report = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert report["job"] == job and report["copies"] == 3 and set(report["groups"]) == {"layer.0", "layer.1", "global"}
    assert main(["audit", "--state-dir", str(server.settings.state_dir), "--job", "job-nope"]) == 2
