"""`pum audit` on real rounds: zero-sum noise without jitter gives the center away; jitter and
independent noise do not; the same figures come out of the CLI."""

from __future__ import annotations

import json

import pytest

from pum.cli import main
from pum.server.audit import audit_round


# κ = 1: the attack's residual from the chance correlation of center and noise over n coordinates,
# ≈ (RMS(center)/σ)·√((m−1)/n), stays small even on this tiny model (n ≈ 2 k per group).
@pytest.mark.parametrize("pum, low, high", [
    ({"noise_structure": "zero_sum", "jitter_tau": 0.0}, 0.0, 0.06),
    ({"noise_structure": "independent"}, 0.3, 1.0),
])
def test_audit_recovery_error(server, tiny_model_dir, pum, low, high):
    job = server.create_job(tiny_model_dir, {"copies_m": 4, "noise_kappa": 1.0, **pum})
    report = audit_round(server.settings.state_dir, job)
    assert low <= report["smallest_relative_error"] <= high, report


def test_reparameterization_hides_the_center_from_a_plain_combination(server, tiny_model_dir):
    pum = {"copies_m": 4, "noise_kappa": 1.0, "use_orthogonal_reparam": True}
    report = audit_round(server.settings.state_dir, server.create_job(tiny_model_dir, pum))
    assert report["reparameterized"]
    assert report["groups"]["global"]["relative_error"] < 0.06  # embeddings and final norm are not transformed
    assert report["groups"]["layer.0"]["relative_error"] > 0.3, report["groups"]["layer.0"]


def test_audit_cli(server, tiny_model_dir, capsys):
    job = server.create_job(tiny_model_dir, {"copies_m": 3})
    assert main(["audit", job, "--state-dir", str(server.settings.state_dir), "--coords", "100"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["job"] == job and report["copies"] == 3 and set(report["groups"]) == {"layer.0", "layer.1", "global"}
    assert main(["audit", "--state-dir", str(server.settings.state_dir), "--job", "job-nope"]) == 2
