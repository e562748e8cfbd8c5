"""The privacy report of a job over HTTP and `pum privacy`: the true ε of the whole job, refusals,
parties, and `pum audit` against the floor the accounting predicts (DESIGN.md §5)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load, save
from scipy.optimize import brentq
from scipy.stats import norm

from pum.cli import main
from pum.common.privacy.report import EVERY_COPY, NO_CLIPPING, RELATIVE_NOISE, UNCLIPPED_GROUPS
from pum.server.audit import audit_round

C, GAMMA = 0.5, 1.3


def dp_job(server, model_dir, base_dir, start=True, **pum):
    settings = {"copies_m": 4, "rounds_R": 2, "dp_epsilon": 4.0, "base_model": str(base_dir),
                "center_clip_C_per_layer": C, "center_clip_C_global": C, **pum}
    return server.create_job(model_dir, settings, start=start)


def finish_round(server, job: str) -> None:
    worker = server.worker(server.token(job, "finisher"))
    while (reply := worker.post("/v1/work/lease").json())["status"] == "leased":
        copy = load(worker.get(f"/v1/work/leases/{reply['lease_id']}/copy").content)
        worker.put(f"/v1/work/leases/{reply['lease_id']}/delta", content=save({n: torch.zeros(t.shape) for n, t in copy.items()}))
        if server.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized":
            return


def strict_json(text: str):
    """json.loads that refuses NaN and ±Infinity (they are not JSON)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def precision_by_hand(alphas, sigma: float, tau: float) -> float:
    """1ᵀΣ⁻¹1 with Σ = σ²·(m/(m−1))·A·P·A + τ²·I, straight from numpy."""
    m, a = len(alphas), np.diag(alphas)
    cov = sigma**2 * m / (m - 1) * a @ (np.eye(m) - np.ones((m, m)) / m) @ a + tau**2 * np.eye(m)
    return float(np.ones(m) @ np.linalg.solve(cov, np.ones(m)))


def test_true_release_job_meets_epsilon_4_over_both_rounds_by_an_independent_recomputation(server, tiny_model_dir,
                                                                                            base_dir):
    job = dp_job(server, tiny_model_dir, base_dir)
    finish_round(server, job)  # round 2 is open: both rounds published
    report = strict_json(server.admin.get(f"/v1/jobs/{job}/privacy").text)
    assert report["dp_target"] == "true_release" and report["rounds"] == 2 and report["rounds_opened"] == 2
    assert 3.9 <= report["epsilon"] <= 4.0 and report["true_release"]["copies"] == 4 and not report["unbounded"]
    assert report["seed_formula"]["is_bound"] is False and "independent" in report["seed_formula"]["assumes"]
    mu2 = 0.0
    for r, (sigmas, taus) in enumerate(zip(report["sigmas"], report["taus"]), start=1):
        alphas = server.alphas(job, r)
        for group, sigma in sigmas.items():
            mu2 += (2 * C * GAMMA ** (r - 1)) ** 2 * precision_by_hand(alphas, sigma, taus[group])
    mu = math.sqrt(mu2)
    eps = brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - 1e-5, 0, 100,
                 xtol=1e-13)
    assert eps == pytest.approx(report["epsilon"], abs=1e-6)


def test_audit_of_that_job_recovers_the_center_no_better_than_epsilon_allows(server, tiny_model_dir, base_dir):
    job = dp_job(server, tiny_model_dir, base_dir)
    report = server.admin.get(f"/v1/jobs/{job}/privacy").json()
    audit = audit_round(server.settings.state_dir, job, coords_per_tensor=4000)
    alphas = server.alphas(job, 1)
    for group, result in audit["groups"].items():
        floor = precision_by_hand(alphas, report["sigmas"][0][group], report["taus"][0][group]) ** -0.5
        assert result["floor_rmse"] == pytest.approx(floor, rel=1e-9)
        assert result["rmse"] >= 0.9 * floor, (group, result)  # no attack beats the floor
        assert result["rmse"] <= 1.1 * floor, (group, result)  # and the strongest one reaches it


def test_seed_is_refused_unless_the_server_runs_in_dev_mode(tmp_path, tiny_model_dir, server_factory):
    production = server_factory(tmp_path, dev_mode=False)
    body = {"task": "t", "model_dir": str(tiny_model_dir), "pum": {"seed": 7}}
    response = production.admin.post("/v1/jobs", json=body)
    assert response.status_code == 400 and "--dev" in response.json()["detail"]
    assert production.admin.get("/v1/jobs").json() == []
    body["pum"] = {}
    assert production.admin.post("/v1/jobs", json=body).status_code == 201  # unseeded jobs are fine


def test_missing_global_clip_norm_refuses_dp_and_never_answers_500(server, tiny_model_dir, base_dir):
    body = {"task": "t", "model_dir": str(tiny_model_dir),
            "pum": {"dp_epsilon": 4.0, "base_model": str(base_dir), "center_clip_C_per_layer": C}}
    response = server.admin.post("/v1/jobs", json=body)
    assert response.status_code == 400 and "center_clip_C_global" in response.json()["detail"]
    body["pum"] = {"sigma_per_layer": [0.1]}  # two layers: refused now, not at the start or in the report
    response = server.admin.post("/v1/jobs", json=body)
    assert response.status_code == 400 and "sigma_per_layer has 1 values" in response.json()["detail"]
    job = server.create_job(tiny_model_dir, {"sigma": 0.1, "jitter_tau": 0.1, "base_model": str(base_dir),
                                             "center_clip_C_per_layer": C})
    response = server.admin.get(f"/v1/jobs/{job}/privacy")
    assert response.status_code == 200 and response.json()["epsilon"] is None
    assert UNCLIPPED_GROUPS.format(groups="global") in response.json()["no_epsilon_reasons"]


@pytest.mark.parametrize("pum, reason", [
    ({"noise_kappa": 0.01, "center_clip_C_per_layer": C, "center_clip_C_global": C}, RELATIVE_NOISE),
    ({"sigma": 0.5, "jitter_tau": 0.5, "server_center_clipping": False, "dp_sensitivity_total_l2": 1.0}, NO_CLIPPING),
])
def test_no_epsilon_for_relative_noise_or_an_unclipped_center(server, tiny_model_dir, base_dir, pum, reason):
    job = server.create_job(tiny_model_dir, {"base_model": str(base_dir), **pum})
    report = server.admin.get(f"/v1/jobs/{job}/privacy").json()
    assert not report["meaningful"] and reason in report["no_epsilon_reasons"]
    assert report["epsilon"] is None and report["seed_formula"]["epsilon"] is None


def test_every_token_is_the_one_data_owner_unless_grouped_into_parties(server, tiny_model_dir, base_dir):
    job = dp_job(server, tiny_model_dir, base_dir, per_token_copy_cap=2)
    first, second = (server.worker(server.token(job, name)) for name in ("a", "b"))
    assert [first.post("/v1/work/lease").json()["status"] for _ in range(3)] == ["leased", "leased", "wait"]
    assert second.post("/v1/work/lease").json()["status"] == "leased"
    report = server.admin.get(f"/v1/jobs/{job}/privacy").json()
    coalition = report["largest_coalition"]
    assert coalition["copies"] == 4 and coalition["source"] == EVERY_COPY and coalition["observed"] == 3
    assert report["epsilon"] == report["true_release"]["epsilon"]

    grouped = dp_job(server, tiny_model_dir, base_dir, per_token_copy_cap=1)
    for party in ("owner-a", "owner-b"):
        reply = server.admin.post(f"/v1/jobs/{grouped}/tokens", json={"label": party, "party": party})
        assert reply.status_code == 201 and reply.json()["party"] == party
    report = server.admin.get(f"/v1/jobs/{grouped}/privacy").json()
    assert report["largest_coalition"]["copies"] == 1 and "2 parties" in report["largest_coalition"]["source"]
    assert report["epsilon"] < report["true_release"]["epsilon"]


def test_privacy_cli_reports_the_whole_job_as_strict_json(tmp_path, tiny_model_dir, base_dir, capsys):
    job_file = tmp_path / "job.yaml"
    pum = (f"  copies_m: 4\n  rounds_R: 2\n  dp_epsilon: 4\n  base_model: {base_dir}\n"
           f"  center_clip_C_per_layer: {C}\n  center_clip_C_global: {C}\n")
    for structure in ("independent", "zero_sum"):
        job_file.write_text(f"task: p\nmodel_dir: {tiny_model_dir}\npum:\n{pum}  noise_structure: {structure}\n")
        assert main(["privacy", str(job_file)]) == 0
        report = strict_json(capsys.readouterr().out)
        assert report["rounds"] == 2  # both rounds, not the first one alone (that printed ε = 2.71)
        assert report["seed_formula"]["epsilon"] == pytest.approx(4.0, abs=1e-9)
        assert report["epsilon"] <= 4.0 and (report["epsilon"] >= 3.9 or structure == "independent")

    job_file.write_text(f"task: p\nmodel_dir: {tiny_model_dir}\npum:\n{pum}  dp_target: seed_formula\n")
    assert main(["privacy", str(job_file)]) == 0
    report = strict_json(capsys.readouterr().out)  # zero-sum without jitter: ∞, written as JSON
    assert report["unbounded"] and report["epsilon"] == "inf" and report["true_release"]["mu"] == "inf"
    assert report["seed_formula"]["is_bound"] is False


def test_leases_grant_a_uniformly_random_pending_copy(server, tiny_model_dir):
    # the lowest pending k first would tell a worker its copy index from the order of its leases
    pum = {"copies_m": 4, "rounds_R": 1, "noise_kappa": 0.01, "max_copy_failures": 100}  # 64 give-backs, no failure
    job = server.create_job(tiny_model_dir, pum)
    worker = server.worker(server.token(job))
    first = []
    for _ in range(64):
        lease = worker.post("/v1/work/lease").json()["lease_id"]
        first.append(server.service.store.lease(lease).k)
        assert worker.post(f"/v1/work/leases/{lease}/release", json={"reason": "again"}).status_code == 200
    counts = np.bincount(first, minlength=4)
    assert counts.min() >= 2 and counts.max() <= 34, counts  # 16 expected each; the lowest-k rule gives [64, 0, 0, 0]


@pytest.mark.parametrize("pum", [
    {},  # relative noise, no clipping
    {"noise_kappa": 0.0},
    {"sigma": 0.1, "center_clip_C_per_layer": C},  # an unclipped global group
    {"sigma_per_layer": [0.1, 0.2], "jitter_tau": 0.1, "center_clip_C_per_layer": C, "center_clip_C_global": C},
    {"sigma": 0.1, "noise_structure": "independent", "per_token_copy_cap": 1},
    {"dp_epsilon": 1.0, "dp_target": "seed_formula", "center_clip_C_per_layer": C, "center_clip_C_global": C},
    {"dp_epsilon": 8.0, "dp_conversion": "exact", "dp_alpha_policy": "expected", "center_clip_C_per_layer": C,
     "center_clip_C_global": C, "use_orthogonal_reparam": True},
])
@pytest.mark.parametrize("state", ["created", "running", "aborted"])
def test_the_privacy_endpoint_answers_strict_json_for_any_job(server, tiny_model_dir, base_dir, pum, state):
    job = server.create_job(tiny_model_dir, {"base_model": str(base_dir), **pum}, start=state != "created")
    if state == "aborted":
        server.admin.post(f"/v1/jobs/{job}/abort")
    response = server.admin.get(f"/v1/jobs/{job}/privacy")
    assert response.status_code == 200, response.text
    report = strict_json(response.text)
    assert report["meaningful"] == (report["epsilon"] is not None)
    assert report["meaningful"] or report["no_epsilon_reasons"]
