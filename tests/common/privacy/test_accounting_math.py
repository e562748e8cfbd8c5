"""Golden numbers and laws of the RDP and exact (analytic Gaussian) accountants (DESIGN.md §5)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from pum.common.privacy.exact import delta_exact, epsilon_exact, log_delta_exact, max_mu_exact
from pum.common.privacy.rdp import conversion_offset, epsilon, max_mu, rdp_gaussian, rdp_to_epsilon
from pum.common.settings import DEFAULT_RDP_ORDERS, PumSettings

DELTA = 1e-5
GOLDEN_EXACT = {1.0: 0.2680511232, 4.0: 0.9249308977, 8.0: 1.6660305978}
GOLDEN_IMPROVED = {1.0: (0.2471952382, 18.0), 4.0: (0.8637299651, 6.0), 8.0: (1.5671851153, 4.0)}


def test_default_order_grid_is_the_designed_one():
    expected = [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5, *range(6, 64), 128, 256]
    assert DEFAULT_RDP_ORDERS == [float(x) for x in expected]
    assert PumSettings().dp_rdp_orders == DEFAULT_RDP_ORDERS


@pytest.mark.parametrize("eps", sorted(GOLDEN_EXACT))
def test_exact_golden_mu(eps):
    mu = max_mu_exact(eps, DELTA)
    assert mu == pytest.approx(GOLDEN_EXACT[eps], abs=1e-9)
    assert epsilon_exact(mu, DELTA) == pytest.approx(eps, abs=1e-9)
    assert delta_exact(eps, mu) == pytest.approx(DELTA, rel=1e-9)


@pytest.mark.parametrize("eps", sorted(GOLDEN_IMPROVED))
def test_improved_rdp_golden_mu_and_order(eps):
    golden_mu, golden_order = GOLDEN_IMPROVED[eps]
    mu, order = max_mu(eps, DELTA, DEFAULT_RDP_ORDERS, "improved")
    assert mu == pytest.approx(golden_mu, abs=1e-9)
    assert order == golden_order
    back, back_order = epsilon(mu, DELTA, DEFAULT_RDP_ORDERS, "improved")
    assert back == pytest.approx(eps, abs=1e-9) and back_order == golden_order


def test_exact_needs_less_noise_than_rdp_by_about_six_to_eight_percent():
    for eps in GOLDEN_EXACT:
        saving = 1 - GOLDEN_IMPROVED[eps][0] / GOLDEN_EXACT[eps]
        assert 0.05 < saving < 0.08


def test_conversions_by_hand():
    # λ = 2, δ = e^-10: improved c = log(1/2) − (−10 + log 2)/1 = 10 − 2·log 2; classic c = 10.
    orders, delta = [2.0], math.exp(-10)
    assert conversion_offset("improved", orders, delta)[0] == pytest.approx(10 - 2 * math.log(2), abs=1e-12)
    assert conversion_offset("classic", orders, delta)[0] == pytest.approx(10.0, abs=1e-12)
    assert rdp_gaussian(2.0, orders)[0] == pytest.approx(4.0)  # λμ²/2 = 2·4/2
    assert epsilon(2.0, delta, orders, "classic") == (pytest.approx(14.0), 2.0)
    with pytest.raises(ValueError, match="unknown RDP conversion 'fancy'.*classic.*improved"):
        epsilon(1.0, DELTA, orders, "fancy")
    with pytest.raises(ValueError, match="> 1"):
        epsilon(1.0, DELTA, [1.0, 2.0])


def test_improved_is_never_worse_than_classic():
    for mu in (0.1, 0.5, 1.0, 3.0, 10.0):
        assert epsilon(mu, DELTA, DEFAULT_RDP_ORDERS, "improved")[0] <= epsilon(mu, DELTA, DEFAULT_RDP_ORDERS,
                                                                                "classic")[0]


def test_edge_values():
    assert epsilon(0.0, DELTA, DEFAULT_RDP_ORDERS)[0] == 0.0
    assert epsilon(math.inf, DELTA, DEFAULT_RDP_ORDERS)[0] == math.inf
    assert epsilon_exact(0.0, DELTA) == 0.0
    assert epsilon_exact(math.inf, DELTA) == math.inf
    assert log_delta_exact(1.0, 0.0) == -math.inf
    # a tiny μ meets any ε ≥ 0 (KL / total-variation branch): calibration always has an answer
    mu, _ = max_mu(1e-6, DELTA, DEFAULT_RDP_ORDERS)
    assert 0 < mu < 1e-4 and epsilon(mu, DELTA, DEFAULT_RDP_ORDERS)[0] <= 1e-6
    assert rdp_to_epsilon([1e-12], [2.0], 1e-3)[0] == 0.0


@settings(max_examples=150, deadline=None)
@given(eps=st.floats(1e-3, 50), log_delta=st.floats(-14, -2), conversion=st.sampled_from(["improved", "classic"]))
def test_rdp_calibration_never_overshoots_and_is_tight(eps, log_delta, conversion):
    delta = 10.0**log_delta
    mu, order = max_mu(eps, delta, DEFAULT_RDP_ORDERS, conversion)
    assert epsilon(mu, delta, DEFAULT_RDP_ORDERS, conversion)[0] <= eps + 1e-9
    # tight: 1e-6 more μ breaks the target (unless the ε = 0 branch holds there too)
    more = epsilon(mu * (1 + 1e-6), delta, DEFAULT_RDP_ORDERS, conversion)[0]
    assert more > eps or more == 0.0


@settings(max_examples=150, deadline=None)
@given(eps=st.floats(1e-3, 50), log_delta=st.floats(-14, -2))
def test_exact_calibration_never_overshoots_and_is_tight(eps, log_delta):
    delta = 10.0**log_delta
    mu = max_mu_exact(eps, delta)
    assert epsilon_exact(mu, delta) <= eps + 1e-9
    assert delta_exact(eps, mu) <= delta * (1 + 1e-9)
    assert delta_exact(eps, mu * (1 + 1e-6)) > delta


@settings(max_examples=100, deadline=None)
@given(mu=st.floats(0.01, 30), log_delta=st.floats(-14, -2))
def test_exact_is_never_worse_than_rdp(mu, log_delta):
    delta = 10.0**log_delta
    assert epsilon_exact(mu, delta) <= epsilon(mu, delta, DEFAULT_RDP_ORDERS, "improved")[0] + 1e-9
