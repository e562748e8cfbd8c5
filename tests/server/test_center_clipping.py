"""Center clipping against a public base, θ_ref's EMA, γ growth, the quantile policy (DESIGN.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file, save

from pum.common.layers import group_names, layer_group
from pum.server.job_files import JobFiles


def tiny(tmp_path_factory_or_path, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path_factory_or_path)
    return tmp_path_factory_or_path


def published_center(server, job: str, round_: int = 1) -> dict[str, torch.Tensor]:
    """Σ_k (1/α_k)·copy_k / S0 over the round's copies (equals θ̃ for zero-sum noise, τ = 0)."""
    worker = server.worker(server.token(job, f"reader{round_}"))
    copies = {}
    m = server.service.store.job(job).spec.settings.copies_m
    for _ in range(m):
        lease = worker.post("/v1/work/lease").json()["lease_id"]
        copies[server.service.store.lease(lease).k] = (lease, load(worker.get(f"/v1/work/leases/{lease}/copy").content))
    alphas = server.alphas(job, round_)
    s0 = sum(1 / a for a in alphas)
    names = copies[0][1].keys()
    center = {n: sum(copies[k][1][n].double() / alphas[k] for k in range(m)) / s0 for n in names}
    return center, worker, {k: lease for k, (lease, _) in copies.items()}


def by_hand_center(theta, ref, thresholds):
    groups = {}
    for name in theta:
        groups.setdefault(layer_group(name), []).append(name)
    out = {}
    for group, names in groups.items():
        norm = math.sqrt(sum((theta[n].double() - ref[n].double()).pow(2).sum().item() for n in names))
        factor = min(1.0, thresholds[group] / norm) if thresholds.get(group) else 1.0
        for n in names:
            out[n] = ref[n].double() + factor * (theta[n].double() - ref[n].double())
    return out


def assert_close_dicts(a, b, atol=2e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].double(), b[name].double(), rtol=0, atol=atol)


def test_center_is_clipped_toward_the_base_and_the_reference_follows(server, tiny_model_dir, tmp_path):
    base = tiny(tmp_path / "base", seed=1)
    pum = {"copies_m": 3, "rounds_R": 2, "base_model": str(base), "center_clip_C_per_layer": 0.5,
           "center_clip_C_global": 0.8, "theta_ref_beta": 0.6, "center_clip_round_gamma": 1.5, "noise_kappa": 0.05}
    job = server.create_job(tiny_model_dir, pum)
    theta = load_file(tiny_model_dir / "model.safetensors")
    base_weights = load_file(base / "model.safetensors")
    thresholds = {"layer.0": 0.5, "layer.1": 0.5, "global": 0.8}

    center1, worker, leases = published_center(server, job)
    expected1 = by_hand_center(theta, base_weights, thresholds)
    assert_close_dicts(center1, expected1)
    for group in group_names(theta):
        distance = math.sqrt(sum((center1[n] - base_weights[n].double()).pow(2).sum().item()
                                 for n in theta if layer_group(n) == group))
        assert distance == pytest.approx(thresholds[group], rel=1e-5)  # clipped: θ is far from the base

    zero = {n: torch.zeros(t.shape) for n, t in theta.items()}
    for lease in leases.values():
        assert worker.put(f"/v1/work/leases/{lease}/delta", content=save(zero)).status_code == 200
    center2, _, _ = published_center(server, job, round_=2)
    reference2 = {n: 0.6 * base_weights[n].double() + 0.4 * expected1[n] for n in theta}
    expected2 = by_hand_center(theta, reference2, {g: c * 1.5 for g, c in thresholds.items()})
    assert_close_dicts(center2, expected2)


def test_relative_noise_uses_the_distance_to_the_base(server, tiny_model_dir, tmp_path):
    base = tiny(tmp_path / "base", seed=2)
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "base_model": str(base), "noise_kappa": 0.1})
    sigmas = server.admin.get(f"/v1/jobs/{job}").json()["rounds"][0]["sigmas"]
    theta, base_weights = load_file(tiny_model_dir / "model.safetensors"), load_file(base / "model.safetensors")
    names = [n for n in theta if layer_group(n) == "layer.0"]
    rms = math.sqrt(sum((theta[n] - base_weights[n]).double().pow(2).sum().item() for n in names)
                    / sum(theta[n].numel() for n in names))
    assert sigmas["layer.0"] == pytest.approx(0.1 * rms, rel=1e-6)


def test_quantile_policy_from_public_reference_models(server, tiny_model_dir, tmp_path):
    base = tiny(tmp_path / "base", seed=3)
    refs = [tiny(tmp_path / f"ref{i}", seed=10 + i) for i in range(4)]
    pum = {"copies_m": 2, "base_model": str(base), "center_clip_ref_model_paths": [str(r) for r in refs],
           "server_center_clipping": True, "center_clip_quantile_q": 0.9, "center_clip_quantile_kappa": 1.2}
    job = server.create_job(tiny_model_dir, pum)
    clip_norms = server.service.store.job(job).spec.clip_norms
    base_weights = load_file(base / "model.safetensors")
    for group in ("layer.0", "layer.1", "global"):
        distances = []
        for ref in refs:
            weights = load_file(ref / "model.safetensors")
            distances.append(math.sqrt(sum((weights[n] - base_weights[n]).double().pow(2).sum().item()
                                           for n in weights if layer_group(n) == group)))
        assert clip_norms[group] == pytest.approx(1.2 * float(np.quantile(distances, 0.9)), rel=1e-9)
    assert not list((server.settings.state_dir / "jobs" / job).glob("reference_*"))  # not kept


@pytest.mark.parametrize("pum, phrase", [
    ({"server_center_clipping": True}, "no threshold"),
    ({"center_clip_ref_model_paths": ["/nope"], "server_center_clipping": True}, "needs base_model"),
    ({"base_model": "/nope"}, "base_model"),
    ({"center_clip_C_per_layer": [1.0, 2.0, 3.0]}, "3 values"),
])
def test_clipping_misconfigurations_are_refused(server, tiny_model_dir, pum, phrase):
    response = server.admin.post("/v1/jobs", json={"task": "t", "model_dir": str(tiny_model_dir), "pum": pum})
    assert response.status_code == 400 and phrase in response.json()["detail"], response.text


def test_a_base_with_other_tensors_is_refused(server, tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                 intermediate_size=32)).save_pretrained(other)
    response = server.admin.post("/v1/jobs", json={"task": "t", "model_dir": str(tiny_model_dir),
                                                   "pum": {"base_model": str(other)}})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "model.layers.2" in detail and "not in the model" in detail


def test_reference_follows_the_published_copies_not_the_secret_center(server, tiny_model_dir, tmp_path):
    # With jitter, Σ_k w_k·copy_k / S0 = θ̃ + τ·Σ_k w_k ξ_k / S0 ≠ θ̃: θ_ref must be built from the
    # former (released), or the next round's center depends on the secret θ̃ of this one and its
    # sensitivity exceeds the 2·C_ℓ·γ^(r−1) the accountant uses.
    base = tiny(tmp_path / "base", seed=1)
    pum = {"copies_m": 3, "rounds_R": 3, "base_model": str(base), "center_clip_C_per_layer": 0.5,
           "center_clip_C_global": 0.8, "theta_ref_beta": 0.6, "center_clip_round_gamma": 1.5, "sigma": 0.01,
           "jitter_tau": 0.02}
    job = server.create_job(tiny_model_dir, pum)
    theta = load_file(tiny_model_dir / "model.safetensors")
    reference = {n: t.double() for n, t in load_file(base / "model.safetensors").items()}
    thresholds = {"layer.0": 0.5, "layer.1": 0.5, "global": 0.8}
    zero = {n: torch.zeros(t.shape) for n, t in theta.items()}
    for round_ in (1, 2):
        released, worker, leases = published_center(server, job, round_)
        for lease in leases.values():
            assert worker.put(f"/v1/work/leases/{lease}/delta", content=save(zero)).status_code == 200
        reference = {n: 0.6 * reference[n] + 0.4 * released[n] for n in theta}  # from downloaded bytes only
        assert_close_dicts(server.blob(job, JobFiles.theta_ref(round_ + 1)), reference, atol=1e-5)
        center = server.blob(job, JobFiles.clipped_center(round_ + 1))  # the next center is clipped around it
        assert_close_dicts(center, by_hand_center(theta, reference, {g: c * 1.5**round_ for g, c in thresholds.items()}),
                           atol=1e-5)


def test_neighbouring_models_with_one_release_history_stay_within_the_sensitivity(server, tiny_model_dir, tmp_path):
    # A and B = θ_base + 3·(θ_A − θ_base) clip to the same round-1 center, so both jobs (one key, one
    # noise) publish the same round 1 and get the same released θ_ref: the coupling in which the
    # accountant's per-round sensitivity 2·C_ℓ·γ^(r−1) is meant. The same uploads then move both
    # models, and round 2's centers differ, by no more than that sensitivity.
    base = tiny(tmp_path / "base", seed=1)
    theta_a = load_file(tiny_model_dir / "model.safetensors")
    base_weights = load_file(base / "model.safetensors")
    model_b = tiny(tmp_path / "b", seed=0)
    from safetensors.torch import save_file
    save_file({n: base_weights[n] + 3 * (t - base_weights[n]) for n, t in theta_a.items()},
              model_b / "model.safetensors", metadata={"format": "pt"})
    pum = {"copies_m": 3, "rounds_R": 2, "base_model": str(base), "center_clip_C_per_layer": 0.5,
           "center_clip_C_global": 0.8, "theta_ref_beta": 0.9, "center_clip_round_gamma": 1.3, "sigma": 0.01,
           "jitter_tau": 0.02}
    jobs = [server.create_job(tiny_model_dir, pum), server.create_job(model_b, pum)]
    step = {n: 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(9)) for n, t in theta_a.items()}
    centers = {}
    for round_ in (1, 2):
        centers[round_] = [server.blob(job, JobFiles.clipped_center(round_)) for job in jobs]
        if round_ == 1:
            for job in jobs:
                worker = server.worker(server.token(job))
                for _ in range(3):
                    lease = worker.post("/v1/work/lease").json()["lease_id"]
                    worker.get(f"/v1/work/leases/{lease}/copy")
                    assert worker.put(f"/v1/work/leases/{lease}/delta", content=save(step)).status_code == 200
    a, b = centers[1]
    assert_close_dicts(a, b, atol=1e-6)  # one release history
    a, b = centers[2]
    for group, c in {"layer.0": 0.5, "layer.1": 0.5, "global": 0.8}.items():
        distance = math.sqrt(sum((a[n].double() - b[n].double()).pow(2).sum().item() for n in a if layer_group(n) == group))
        assert 0 < distance <= 2 * c * 1.3 + 1e-6, group
