"""Agreement with Google's `dp-accounting` (a test-only oracle, not a runtime dependency)."""

from __future__ import annotations

import math

import numpy as np
import pytest

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting import dp_event, gaussian_mechanism  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402

from pum.common.privacy.exact import epsilon_exact, max_mu_exact  # noqa: E402
from pum.common.privacy.rdp import epsilon, max_mu, rdp_gaussian, rdp_to_epsilon  # noqa: E402
from pum.common.settings import DEFAULT_RDP_ORDERS  # noqa: E402

N_CONFIGS = 120


def _configs(seed: int):
    """Random (μ per round, rounds, δ, orders): orders either the default grid or a random set."""
    rng = np.random.default_rng(seed)
    for i in range(N_CONFIGS):
        mu = float(np.exp(rng.uniform(np.log(0.02), np.log(20.0))))
        rounds = int(rng.integers(1, 40))
        delta = float(10.0 ** rng.uniform(-12, -2))
        if i % 2:
            orders = DEFAULT_RDP_ORDERS
        else:
            orders = sorted(set(np.round(rng.uniform(1.02, 300.0, size=int(rng.integers(1, 40))), 6).tolist()))
        yield mu, rounds, delta, orders


def _oracle(mu: float, rounds: int, orders) -> rdp_privacy_accountant.RdpAccountant:
    accountant = rdp_privacy_accountant.RdpAccountant(orders)
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier=1.0 / mu), rounds)
    return accountant


def test_rdp_values_and_improved_epsilon_agree():
    for mu, rounds, delta, orders in _configs(0):
        oracle = _oracle(mu, rounds, orders)
        ours_rdp = rdp_gaussian(mu * math.sqrt(rounds), orders)  # μ² adds over rounds
        np.testing.assert_allclose(ours_rdp, oracle.rdp, rtol=1e-12)
        want_eps, want_order = oracle.get_epsilon_and_optimal_order(delta)
        got_eps, got_order = epsilon(mu * math.sqrt(rounds), delta, orders, "improved")
        assert got_eps == pytest.approx(want_eps, abs=1e-8, rel=1e-10), (mu, rounds, delta)
        assert got_eps == pytest.approx(rdp_to_epsilon(oracle.rdp, orders, delta)[0], rel=1e-13, abs=1e-12)
        if want_eps > 0:
            assert got_order == want_order


def test_classic_epsilon_from_the_oracle_rdp():
    # dp-accounting converts with the improved rule only: check the classic rule on its RDP values
    for mu, rounds, delta, orders in _configs(1):
        oracle = _oracle(mu, rounds, orders)
        want = max(0.0, min(r + math.log(1 / delta) / (a - 1) for a, r in zip(oracle.orders, oracle.rdp)))
        got = epsilon(mu * math.sqrt(rounds), delta, orders, "classic")[0]
        assert got == pytest.approx(want, abs=1e-8, rel=1e-10)


def test_rdp_calibration_meets_the_target_in_the_oracle():
    rng = np.random.default_rng(2)
    for _ in range(N_CONFIGS):
        eps, delta, rounds = float(rng.uniform(0.1, 30)), float(10.0 ** rng.uniform(-12, -2)), int(rng.integers(1, 20))
        mu_total, _ = max_mu(eps, delta, DEFAULT_RDP_ORDERS, "improved")
        oracle = _oracle(mu_total / math.sqrt(rounds), rounds, DEFAULT_RDP_ORDERS)
        assert oracle.get_epsilon(delta) == pytest.approx(eps, abs=1e-8)


def test_exact_epsilon_and_sigma_agree():
    rng = np.random.default_rng(3)
    for _ in range(N_CONFIGS):
        mu = float(np.exp(rng.uniform(np.log(0.02), np.log(30.0))))
        delta = float(10.0 ** rng.uniform(-12, -2))
        want = gaussian_mechanism.get_epsilon_gaussian(1.0 / mu, delta)
        assert epsilon_exact(mu, delta) == pytest.approx(want, abs=1e-8, rel=1e-9), (mu, delta)
        eps = float(rng.uniform(0.01, 40))
        want_mu = 1.0 / gaussian_mechanism.get_sigma_gaussian(eps, delta)
        assert max_mu_exact(eps, delta) == pytest.approx(want_mu, rel=1e-8), (eps, delta)


def test_exact_sits_just_below_the_pld_accountant():
    # The PLD accountant discretises (pessimistically), so it agrees only to its grid.
    from dp_accounting.pld import pld_privacy_accountant

    for mu, rounds, delta in ((0.5, 1, 1e-5), (0.3, 10, 1e-6), (1.2, 3, 1e-4)):
        accountant = pld_privacy_accountant.PLDAccountant()
        accountant.compose(dp_event.GaussianDpEvent(noise_multiplier=1.0 / mu), rounds)
        pld = accountant.get_epsilon(delta)
        ours = epsilon_exact(mu * math.sqrt(rounds), delta)
        assert ours <= pld + 1e-9
        assert pld - ours < 1e-2
