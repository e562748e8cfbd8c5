"""The true guarantee of the released copies, checked against the min-variance attack (DESIGN.md §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings, strategies as st

from pum.common.noise import CopyNoise, draw_alphas, job_key_from_seed, mean_base_noise
from pum.common.privacy.audit import (
    audit, center_free_weights, estimate_center, min_variance_weights, noise_covariance_from_differences,
)
from pum.common.privacy.calibration import max_mu_for, s_alpha
from pum.common.privacy.exact import epsilon_exact
from pum.common.privacy.release import copy_covariance, ones_precision, round_mu_squared, true_epsilon, true_mu
from pum.common.settings import DEFAULT_RDP_ORDERS

N = 200_000
M = 4


def publish(structure: str, sigma: float, tau: float, center: torch.Tensor, seed: int = 3):
    """The m copies of round 1 as the server builds them (pum.common.noise), and their α."""
    key = job_key_from_seed(seed)
    alphas = draw_alphas(key, 1, M, 1.0, 2.0)
    z_mean = mean_base_noise(key, 1, M, "w", center.shape) if structure == "zero_sum" else None
    copies = [CopyNoise(key, 1, k, M, alphas[k], tau, structure).add_noise_inplace("w", center.clone(), sigma, z_mean)
              for k in range(M)]
    return copies, alphas


def test_covariances_by_hand():
    cov = copy_covariance([1.0, 2.0], sigma=1.0, tau=0.0, structure="zero_sum")
    # m = 2: ε⁰ = ±(z1 − z2)/√2·√2 → copies' noises are α1·e and −α2·e with Var e = 1
    np.testing.assert_allclose(cov, [[1.0, -2.0], [-2.0, 4.0]])
    np.testing.assert_allclose(copy_covariance([1.0, 2.0], 1.0, 0.5, "independent"), [[1.25, 0], [0, 4.25]])
    with pytest.raises(ValueError, match="unknown noise structure"):
        copy_covariance([1.0, 2.0], 1.0, 0.0, "circular")


def test_independent_without_jitter_is_the_seed_formula():
    alphas, sigmas, sens = [1.1, 1.4, 1.7, 1.9], {"a": 0.7, "b": 2.0}, {"a": 1.0, "b": 3.0}
    formula = s_alpha("realized", 4, 1.0, 2.0, alphas) * sum(d * d / sigmas[g] ** 2 for g, d in sens.items())
    assert round_mu_squared(alphas, sigmas, sens, 0.0, "independent") == pytest.approx(formula, rel=1e-12)
    assert true_mu([alphas, alphas], sigmas, sens, 0.0, "independent") == pytest.approx(math.sqrt(2 * formula))


def test_zero_sum_without_jitter_has_no_guarantee_but_subsets_do():
    alphas = [1.1, 1.4, 1.7, 1.9]
    cov = copy_covariance(alphas, 0.5, 0.0, "zero_sum")
    assert ones_precision(cov) == math.inf
    assert true_epsilon(true_mu([alphas], {"a": 0.5}, {"a": 1.0}, 0.0, "zero_sum"), 1e-5) == math.inf
    for j in range(1, M):
        assert math.isfinite(ones_precision(cov, list(range(j))))
    assert ones_precision(copy_covariance(alphas, 0.0, 0.0, "independent")) == math.inf  # no noise at all


def test_jitter_restores_a_finite_guarantee_near_the_asymptote():
    alphas, sigma, tau = [1.1, 1.4, 1.7, 1.9], 1.0, 0.01
    s0, sa = sum(1 / a for a in alphas), sum(1 / a**2 for a in alphas)
    prec = ones_precision(copy_covariance(alphas, sigma, tau, "zero_sum"))
    assert math.isfinite(prec)
    assert prec == pytest.approx(s0**2 / (sa * tau**2), rel=1e-2)  # 1ᵀΣ⁻¹1 ≈ S0²/(S_α·τ²) + (the rest)
    assert prec > s0**2 / (sa * tau**2)


def test_tau_a_tenth_of_sigma_turns_a_claimed_four_into_about_122():
    # α at the midpoints of U[1, 2] quarters (m = 4), realized S_α, improved-RDP calibration to ε = 4
    alphas = [1.125, 1.375, 1.625, 1.875]
    mu_star, _ = max_mu_for(4.0, 1e-5, "improved", DEFAULT_RDP_ORDERS)
    sigma = math.sqrt(s_alpha("realized", M, 1.0, 2.0, alphas)) / mu_star  # Δ̄ = 1, one layer, R = 1
    independent = true_mu([alphas], {"w": sigma}, {"w": 1.0}, 0.0, "independent")
    assert independent == pytest.approx(mu_star, rel=1e-12)
    mu = true_mu([alphas], {"w": sigma}, {"w": 1.0}, 0.1 * sigma, "zero_sum")
    assert true_epsilon(mu, 1e-5) == pytest.approx(123.1, abs=0.1)
    # with S_α = m/(α_min·α_max) ("expected") the same setup gives 122.2; τ ≈ σ gives back ≈ the claim
    sigma_e = math.sqrt(s_alpha("expected", M, 1.0, 2.0)) / mu_star
    assert true_epsilon(true_mu([alphas], {"w": sigma_e}, {"w": 1.0}, 0.1 * sigma_e, "zero_sum"), 1e-5) == \
        pytest.approx(122.2, abs=0.1)
    assert 4.0 < true_epsilon(true_mu([alphas], {"w": sigma}, {"w": 1.0}, sigma, "zero_sum"), 1e-5) < 6.0


@hsettings(max_examples=100, deadline=None)
@given(m=st.integers(2, 7), u=st.lists(st.floats(0, 1), min_size=7, max_size=7), sigma=st.floats(0.05, 5),
       tau=st.floats(0.0, 3.0), structure=st.sampled_from(["zero_sum", "independent"]), data=st.data())
def test_more_copies_never_lower_mu(m, u, sigma, tau, structure, data):
    alphas = [1.0 + 2.0 * x for x in u[:m]]
    order = data.draw(st.permutations(list(range(m))))
    cov = copy_covariance(alphas, sigma, tau, structure)
    values = [ones_precision(cov, order[:j]) for j in range(1, m + 1)]
    for small, large in zip(values, values[1:]):
        assert large >= small * (1 - 1e-9)
    worst = [true_mu([alphas], {"w": sigma}, {"w": 1.0}, tau, structure, j) for j in range(1, m + 1)]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(worst, worst[1:]))


def test_zero_sum_without_jitter_audit_recovers_the_center():
    gen = torch.Generator().manual_seed(0)
    sigma = 0.05
    center = sigma * torch.randn(N, generator=gen)  # the center relative to θ_ref, about σ in size
    copies, alphas = publish("zero_sum", sigma, 0.0, center)
    assert true_mu([alphas], {"w": sigma}, {"w": 1.0}, 0.0, "zero_sum") == math.inf
    result = audit(copies, center)
    assert result["relative_error"] < 0.01
    np.testing.assert_allclose(result["weights"], np.array([1 / a for a in alphas]) / sum(1 / a for a in alphas),
                               atol=5e-3)
    assert result["mean_rmse"] > 5 * result["rmse"]  # the plain mean does not cancel


def test_audit_with_a_public_reference_recovers_a_large_center():
    # a center far larger than σ but close to a public base: subtracting the base keeps the attack exact
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(N, generator=gen)
    center = base + 0.01 * torch.randn(N, generator=gen)
    copies, _ = publish("zero_sum", 0.05, 0.0, center)
    assert audit(copies, center, reference=base)["relative_error"] < 0.01
    estimate = estimate_center(copies, reference=base)
    assert estimate.shape == (N,) and float(np.sqrt(np.mean((estimate - center.numpy()) ** 2))) < 0.01 * 0.05  # 1% of σ


@pytest.mark.parametrize("tau_ratio", [0.1, 1.0])
def test_independent_noise_audit_matches_the_predicted_std(tau_ratio):
    gen = torch.Generator().manual_seed(2)
    sigma = 0.05
    center = sigma * torch.randn(N, generator=gen)
    tau = tau_ratio * sigma
    copies, alphas = publish("independent", sigma, tau, center)
    mu = true_mu([alphas], {"w": sigma}, {"w": 1.0}, tau, "independent")
    assert math.isfinite(epsilon_exact(mu, 1e-5))
    predicted = ones_precision(copy_covariance(alphas, sigma, tau, "independent")) ** -0.5
    assert audit(copies, center)["rmse"] == pytest.approx(predicted, rel=0.10)


def test_zero_sum_with_jitter_audit_matches_the_predicted_std():
    gen = torch.Generator().manual_seed(4)
    sigma = 0.05
    center = sigma * torch.randn(N, generator=gen)
    copies, alphas = publish("zero_sum", sigma, 0.1 * sigma, center)
    predicted = ones_precision(copy_covariance(alphas, sigma, 0.1 * sigma, "zero_sum")) ** -0.5
    result = audit(copies, center)
    assert result["rmse"] == pytest.approx(predicted, rel=0.10)
    assert result["rmse"] < 0.1 * result["per_copy_noise_rms"]  # far below what each copy suggests


def test_weights_accept_numpy_and_refuse_bad_input():
    x = np.arange(6.0).reshape(2, 3)
    assert min_variance_weights([x[0], x[1]]).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two copies"):
        min_variance_weights([x[0]])
    with pytest.raises(ValueError, match="same number of elements"):
        min_variance_weights([x[0], x[1, :2]])


def test_center_free_attack_is_immune_to_a_large_center():
    # a center 100× the noise: the min-variance weights pick up its chance correlation with the noise,
    # the differences x_k − x_j do not contain it at all
    gen = torch.Generator().manual_seed(5)
    sigma, tau = 0.05, 0.005
    center = 100 * sigma * torch.randn(20_000, generator=gen)
    copies, alphas = publish("zero_sum", sigma, tau, center)
    floor = ones_precision(copy_covariance(alphas, sigma, tau, "zero_sum")) ** -0.5
    result = audit(copies, center, structure="zero_sum", floor_rmse=floor)
    attacks = result["attacks"]
    assert result["strongest"] == "center_free" and result["rmse_over_floor"] == pytest.approx(1.0, rel=0.10)
    assert attacks["min_variance"]["rmse"] > 5 * attacks["center_free"]["rmse"]
    np.testing.assert_allclose(center_free_weights(copies, "zero_sum"), attacks["center_free"]["weights"])


@pytest.mark.parametrize("structure, tau_ratio", [("zero_sum", 0.0), ("independent", 0.3)])
def test_noise_covariance_fitted_from_differences(structure, tau_ratio):
    gen = torch.Generator().manual_seed(6)
    sigma = 0.05
    center = 10 * torch.randn(N, generator=gen)  # 200 σ: invisible in the differences
    copies, alphas = publish(structure, sigma, tau_ratio * sigma, center)
    fitted = noise_covariance_from_differences(copies, structure)
    truth = copy_covariance(alphas, sigma, tau_ratio * sigma, structure)
    if structure == "independent":  # the diagonal σ²α_k² + τ² is what is identifiable (and all that matters)
        np.testing.assert_allclose(np.diag(fitted), np.diag(truth), rtol=0.02)
    else:  # τ = 0: the weights ∝ 1/β cancel the zero-sum noise, whatever the center
        assert audit(copies, center, structure=structure)["attacks"]["center_free"]["relative_error"] < 0.01
    assert noise_covariance_from_differences(copies[:2], structure) is None  # m = 2: not identifiable


def test_alignment_undoes_the_reparameterization(tmp_path):
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from pum.common.privacy.align import align_layer
    from pum.common.reparam import CopyTransform, adapter_for

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=8,
                                         num_key_value_heads=2, intermediate_size=96, attention_bias=True))
    config = json.loads(model.config.to_json_string())
    config["architectures"] = ["LlamaForCausalLM"]
    theta = {n: t.detach() for n, t in model.state_dict().items() if n.startswith("model.layers.0.")}
    adapter = adapter_for(config)
    key, gen = job_key_from_seed(1), torch.Generator().manual_seed(1)
    transforms = [CopyTransform(adapter, config, key, 1, k) for k in range(M)]
    for noise in (0.0, 0.05):
        copies = [{n: t.forward(n, v + noise * v.std() * torch.randn(v.shape, generator=gen)).double().numpy()
                   for n, v in theta.items()} for t in transforms]
        aligned = align_layer(copies, adapter, adapter.dims(config), 0)
        for n, v in theta.items():
            truth = transforms[0].forward(n, v).double().numpy()
            for k in range(M):
                assert np.abs(aligned[k][n] - truth).max() <= 1e-5 + 10 * noise * float(v.std()), (n, k)
            if noise == 0.0 and transforms[0].touches(n) and float(v.abs().max()) > 0:
                assert np.abs(copies[1][n] - truth).max() > 1e-3  # unaligned copies really differ
