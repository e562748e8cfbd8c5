"""dp_target: calibrating the jitter τ_ℓ so the true ε of all copies meets the target (DESIGN.md §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st
from scipy.optimize import brentq
from scipy.stats import norm

from pum.common.errors import InvalidInput
from pum.common.privacy.release import copy_covariance, ones_precision, smallest_tau, true_epsilon, true_mu
from pum.common.privacy.target import SEED_FORMULA_METHOD, TRUE_RELEASE_METHOD, calibrate_round
from pum.common.settings import PumSettings

SIZES = {"layer.0": 1000, "layer.1": 4000, "global": 20000}
CLIPS = {"layer.0": 1.0, "layer.1": 2.0, "global": 0.5}
ALPHAS = [1.1, 1.4, 1.7, 1.9]


def exact_epsilon_by_hand(mu: float, delta: float) -> float:
    """ε with Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) = δ, straight from scipy (an oracle independent of `exact`)."""
    f = lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta  # noqa: E731
    return brentq(f, 0.0, 200.0, xtol=1e-14)


def test_dp_target_defaults_by_noise_structure():
    assert PumSettings(dp_epsilon=4.0).dp_target == "true_release"
    assert PumSettings(dp_epsilon=4.0, noise_structure="independent").dp_target == "seed_formula"
    assert PumSettings(dp_epsilon=4.0, dp_target="seed_formula").dp_target == "seed_formula"


def test_smallest_tau_is_the_boundary_of_the_target():
    sigma, sens, target = 2.0, 1.5, 0.3
    tau = smallest_tau(ALPHAS, sigma, sens, "zero_sum", target)
    mu2 = lambda t: sens**2 * ones_precision(copy_covariance(ALPHAS, sigma, t, "zero_sum"))  # noqa: E731
    assert mu2(tau) <= target and mu2(tau * (1 - 1e-9)) > target
    assert smallest_tau(ALPHAS, sigma, sens, "zero_sum", target, tau_min=10 * tau) == 10 * tau  # already enough
    assert smallest_tau(ALPHAS, sigma, 0.0, "zero_sum", target) == 0.0  # nothing to hide
    # independent noise already below the target needs no jitter at all
    assert smallest_tau(ALPHAS, 100.0, sens, "independent", target) == 0.0


def test_true_release_target_meets_epsilon_over_all_rounds():
    settings = PumSettings(dp_epsilon=4.0, rounds_R=2, copies_m=4)
    rounds = [ALPHAS, [1.2, 1.3, 1.8, 1.6]]
    mu2 = 0.0
    for r, alphas in enumerate(rounds):
        clips = {g: c * 1.3**r for g, c in CLIPS.items()}
        noise = calibrate_round(settings, SIZES, clips, alphas)
        assert noise.method == TRUE_RELEASE_METHOD and noise.sigmas == noise.calibration.sigmas
        assert all(t > 0 for t in noise.taus.values())
        # recomputed with numpy alone: Σ_ℓ = σ²·(m/(m−1))·A·P·A + τ²·I, μ² += Δ̄²·1ᵀΣ⁻¹1
        a, m = np.diag(alphas), len(alphas)
        p = np.eye(m) - np.ones((m, m)) / m
        for g, c in clips.items():
            cov = noise.sigmas[g] ** 2 * m / (m - 1) * a @ p @ a + noise.taus[g] ** 2 * np.eye(m)
            mu2 += (2 * c) ** 2 * float(np.ones(m) @ np.linalg.solve(cov, np.ones(m)))
    eps = exact_epsilon_by_hand(math.sqrt(mu2), 1e-5)
    assert 3.9 <= eps <= 4.0 and eps == pytest.approx(4.0, abs=1e-6)


def test_seed_formula_target_keeps_the_manual_jitter():
    settings = PumSettings(dp_epsilon=4.0, dp_target="seed_formula", jitter_tau=0.25)
    noise = calibrate_round(settings, SIZES, CLIPS, ALPHAS)
    assert noise.method == SEED_FORMULA_METHOD and set(noise.taus.values()) == {0.25}
    # the formula's σ with a small jitter leaves the party holding every copy almost unprotected
    mu = true_mu([ALPHAS], noise.sigmas, {g: 2 * c for g, c in CLIPS.items()}, noise.taus, "zero_sum")
    assert true_epsilon(mu, 1e-5) > 20


def test_true_release_needs_every_clipping_norm():
    settings = PumSettings(dp_epsilon=4.0, dp_sensitivity_total_l2=3.0)
    with pytest.raises(InvalidInput, match="every layer group"):
        calibrate_round(settings, SIZES, {**CLIPS, "global": None}, ALPHAS)


@hsettings(max_examples=60, deadline=None)
@given(eps=st.floats(0.5, 32), rounds=st.integers(1, 6), m=st.integers(2, 8), tau0=st.floats(0, 2),
       structure=st.sampled_from(["zero_sum", "independent"]), u=st.lists(st.floats(0, 1), min_size=8, max_size=8),
       clips=st.lists(st.floats(0.01, 100), min_size=3, max_size=3))
def test_true_release_never_overshoots(eps, rounds, m, tau0, structure, u, clips):
    settings = PumSettings(dp_epsilon=eps, rounds_R=rounds, copies_m=m, jitter_tau=tau0, noise_structure=structure,
                           dp_target="true_release")
    alphas = [1.0 + x for x in u[:m]]
    clip = dict(zip(SIZES, clips))
    noise = calibrate_round(settings, SIZES, clip, alphas)
    assert all(t >= tau0 for t in noise.taus.values())
    mu = true_mu([alphas] * rounds, noise.sigmas, {g: 2 * c for g, c in clip.items()}, noise.taus, structure)
    assert true_epsilon(mu, settings.dp_delta) <= eps + 1e-9
