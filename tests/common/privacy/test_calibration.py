"""S_α policies, allocations of the budget over layers, and calibrate()'s fallbacks (DESIGN.md §5)."""

from __future__ import annotations

import logging
import math

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from pum.common.errors import InvalidInput
from pum.common.privacy.calibration import (
    calibrate, epsilon_for, equalized_sigmas, max_mu_for, s_alpha, single_sigma, total_variance, varmin_sigmas,
)
from pum.common.settings import DEFAULT_RDP_ORDERS, PumSettings

SIZES = {"layer.0": 1000, "layer.1": 4000, "global": 20000}
CLIPS = {"layer.0": 1.0, "layer.1": 2.0, "global": 0.5}


def formula_mu(cal, sens, rounds):
    """μ of R rounds by the independent-copies formula: √(R·S_α·Σ Δ̄²/σ²)."""
    return math.sqrt(rounds * cal.s_alpha * sum(d * d / cal.sigma_for(g) ** 2 for g, d in sens.items()))


def test_s_alpha_policies_by_hand():
    assert s_alpha("worstcase", 4, 1.0, 2.0) == 4.0           # m/α_min²
    assert s_alpha("expected", 4, 1.0, 2.0) == 2.0            # m/(α_min·α_max)
    assert s_alpha("realized", 4, 1.0, 2.0, [1.0, 2.0, 2.0, 1.0]) == 2.5  # 1 + 1/4 + 1/4 + 1
    assert s_alpha("worstcase", 3, 2.0, 4.0) == 0.75
    with pytest.raises(InvalidInput, match="realized"):
        s_alpha("realized", 4, 1.0, 2.0)
    with pytest.raises(ValueError, match="unknown S_α policy"):
        s_alpha("optimistic", 4, 1.0, 2.0)


def test_expected_is_the_mean_of_one_over_alpha_squared_for_uniform_alpha():
    # E[1/α²] for α ~ U[a, b] is (1/a − 1/b)/(b − a) = 1/(a·b): an average, hence not a bound
    a, b, n = 1.0, 3.0, 200_000
    mean = sum(1 / (a + (b - a) * (i + 0.5) / n) ** 2 for i in range(n)) / n
    assert mean == pytest.approx(s_alpha("expected", 1, a, b), rel=1e-8)
    assert s_alpha("worstcase", 1, a, b) > mean


def test_allocations_by_hand():
    sens, sizes = {"a": 2.0, "b": 4.0}, {"a": 1, "b": 4}
    eq = equalized_sigmas(sens, budget=2.0)                   # σ = Δ̄·√(L/B) = Δ̄
    assert eq == {"a": pytest.approx(2.0), "b": pytest.approx(4.0)}
    vm = varmin_sigmas(sens, sizes, budget=1.0)               # K = 2·1 + 4·2 = 10; σ² = 10·Δ̄/√d
    assert vm == {"a": pytest.approx(math.sqrt(20)), "b": pytest.approx(math.sqrt(20))}
    assert total_variance(vm, sizes) == pytest.approx(100.0)  # K²/B
    assert total_variance(equalized_sigmas(sens, 1.0), sizes) == pytest.approx(136.0)
    assert single_sigma(math.sqrt(20.0), budget=5.0) == pytest.approx(2.0)


@pytest.mark.parametrize("conversion", ["improved", "classic", "exact"])
@pytest.mark.parametrize("policy", ["worstcase", "expected", "realized"])
@pytest.mark.parametrize("allocation", ["auto", "equalized", "varmin"])
def test_calibrated_sigmas_spend_exactly_the_target(conversion, policy, allocation):
    settings = PumSettings(dp_epsilon=4.0, rounds_R=3, copies_m=4, dp_conversion=conversion,
                           dp_alpha_policy=policy, dp_per_layer_allocation=allocation)
    cal = calibrate(settings, SIZES, CLIPS, alphas=[1.1, 1.3, 1.7, 1.9])
    sens = {g: 2 * c for g, c in CLIPS.items()}
    assert cal.sensitivities == sens and not cal.fallback
    assert formula_mu(cal, sens, 3) == pytest.approx(cal.mu_target, rel=1e-12)
    eps, order = epsilon_for(cal.mu_target, settings.dp_delta, conversion, DEFAULT_RDP_ORDERS)
    assert eps == pytest.approx(4.0, abs=1e-9) and order == cal.order
    assert (order is None) == (conversion == "exact")
    assert cal.allocation == ("equalized" if allocation == "equalized" else "varmin")
    assert cal.total_variance == pytest.approx(total_variance(cal.sigmas, SIZES))


def test_auto_per_order_search_matches_best_order():
    # searching every order and both allocations finds the same σ as best order + smaller variance
    settings = PumSettings(dp_epsilon=2.0, rounds_R=2, dp_per_layer_allocation="auto")
    cal = calibrate(settings, SIZES, CLIPS)
    sens = {g: 2 * c for g, c in CLIPS.items()}
    best = None
    for order in DEFAULT_RDP_ORDERS:
        mu, _ = max_mu_for(2.0, settings.dp_delta, "improved", [order])
        budget = mu**2 / 2 / cal.s_alpha
        for sig in (equalized_sigmas(sens, budget), varmin_sigmas(sens, SIZES, budget)):
            tv = total_variance(sig, SIZES)
            best = min(best, (tv, order), key=lambda x: x[0]) if best else (tv, order)
    assert cal.total_variance == pytest.approx(best[0], rel=1e-12) and cal.order == best[1]


def test_per_layer_sensitivities_from_settings():
    settings = PumSettings(dp_epsilon=4.0, dp_sensitivity_per_layer_l2=[2.0, 4.0, 1.0])
    cal = calibrate(settings, SIZES, None)
    assert cal.sensitivities == {"layer.0": 2.0, "layer.1": 4.0, "global": 1.0}
    assert cal.allocation == "varmin" and not cal.warnings


def test_single_sigma_when_per_layer_noise_is_off():
    settings = PumSettings(dp_epsilon=4.0, per_layer_noise=False)
    cal = calibrate(settings, SIZES, CLIPS)
    total = math.sqrt(sum((2 * c) ** 2 for c in CLIPS.values()))
    assert cal.allocation == "single" and len(set(cal.sigmas.values())) == 1
    assert cal.default_sigma == pytest.approx(total / math.sqrt(cal.budget))
    assert cal.sigma_for("some.other.tensor.group") == cal.default_sigma
    explicit = calibrate(PumSettings(dp_epsilon=4.0, per_layer_noise=False, dp_sensitivity_total_l2=3.0), SIZES, None)
    assert explicit.default_sigma == pytest.approx(3.0 / math.sqrt(explicit.budget)) and not explicit.warnings


def test_fallback_to_single_sigma_without_sizes(caplog):
    settings = PumSettings(dp_epsilon=4.0, dp_per_layer_allocation="varmin")
    with caplog.at_level(logging.WARNING):
        cal = calibrate(settings, None, CLIPS)
    assert cal.allocation == "single" and cal.total_variance is None
    assert "needs the layer sizes" in caplog.text and cal.warnings
    # equalized needs no sizes
    assert calibrate(PumSettings(dp_epsilon=4.0, dp_per_layer_allocation="equalized"), None, CLIPS).allocation == \
        "equalized"


def test_fallback_to_single_sigma_without_per_layer_sensitivities(caplog):
    settings = PumSettings(dp_epsilon=4.0, dp_sensitivity_total_l2=5.0)
    with caplog.at_level(logging.WARNING):
        cal = calibrate(settings, SIZES, {"layer.0": 1.0})  # C_ℓ missing for two groups
    assert cal.allocation == "single" and cal.default_sigma == pytest.approx(5.0 / math.sqrt(cal.budget))
    assert "per-layer sensitivities are unknown" in caplog.text


def test_infeasible_calibration_keeps_the_manual_sigma(caplog):
    settings = PumSettings(dp_epsilon=4.0)
    manual = {g: 0.01 for g in SIZES}
    with caplog.at_level(logging.WARNING):
        cal = calibrate(settings, SIZES, None, manual_sigmas=manual)
    assert cal.fallback and cal.allocation == "manual" and cal.sigmas == manual
    assert "no feasible DP calibration" in caplog.text and any("no DP guarantee" in w for w in cal.warnings)
    with pytest.raises(InvalidInput, match="no sensitivity is known"):
        calibrate(settings, SIZES, None)
    with pytest.raises(InvalidInput, match="dp_epsilon"):
        calibrate(PumSettings(sigma=0.1), SIZES, CLIPS)


def test_target_below_the_order_grid_warns(caplog):
    # with δ = 1e-10 the largest order (256) certifies no ε below ≈ 0.0646: only the TV bound is left
    settings = PumSettings(dp_epsilon=0.0625, dp_delta=1e-10, per_layer_noise=False)
    with caplog.at_level(logging.WARNING):
        cal = calibrate(settings, SIZES, CLIPS)
    assert cal.mu_target < 1e-9 and "below what the RDP orders can certify" in caplog.text
    mu = math.sqrt(cal.s_alpha * sum((2 * c) ** 2 / cal.sigma_for(g) ** 2 for g, c in CLIPS.items()))
    assert epsilon_for(mu, 1e-10, "improved", DEFAULT_RDP_ORDERS)[0] == 0.0
    assert not calibrate(PumSettings(dp_epsilon=0.0625, dp_delta=1e-10, dp_conversion="exact"), SIZES, CLIPS).warnings


def test_expected_policy_is_labelled_an_average(caplog):
    with caplog.at_level(logging.WARNING):
        cal = calibrate(PumSettings(dp_epsilon=4.0, dp_use_worstcase_alpha=False), SIZES, CLIPS)
    assert cal.policy == "expected" and "not a bound" in caplog.text


groups = st.dictionaries(st.sampled_from([f"layer.{i}" for i in range(8)] + ["global"]),
                         st.tuples(st.floats(1e-3, 1e3), st.integers(1, 10**7)), min_size=1)


@hsettings(max_examples=200, deadline=None)
@given(groups=groups, budget=st.floats(1e-4, 1e4))
def test_varmin_never_has_more_variance_than_equalized_or_single(groups, budget):
    sens = {g: d for g, (d, _) in groups.items()}
    sizes = {g: n for g, (_, n) in groups.items()}
    vm = varmin_sigmas(sens, sizes, budget)
    single = single_sigma(math.sqrt(sum(d * d for d in sens.values())), budget)
    tv = total_variance(vm, sizes)
    assert tv <= total_variance(equalized_sigmas(sens, budget), sizes) * (1 + 1e-12)
    assert tv <= total_variance({g: single for g in sizes}, sizes) * (1 + 1e-12)
    assert sum(d * d / vm[g] ** 2 for g, d in sens.items()) == pytest.approx(budget, rel=1e-9)


@hsettings(max_examples=150, deadline=None)
@given(eps=st.floats(0.05, 30), log_delta=st.floats(-12, -3), rounds=st.integers(1, 20), m=st.integers(2, 12),
       amax=st.floats(1.0, 5.0), conversion=st.sampled_from(["improved", "classic", "exact"]),
       policy=st.sampled_from(["worstcase", "realized"]), allocation=st.sampled_from(["auto", "equalized", "varmin"]),
       per_layer=st.booleans(), groups=groups, u=st.lists(st.floats(0, 1), min_size=12, max_size=12))
def test_calibrated_noise_never_overshoots_the_target(eps, log_delta, rounds, m, amax, conversion, policy, allocation,
                                                      per_layer, groups, u):
    settings = PumSettings(dp_epsilon=eps, dp_delta=10.0**log_delta, rounds_R=rounds, copies_m=m, alpha_max=amax,
                           dp_conversion=conversion, dp_alpha_policy=policy, dp_per_layer_allocation=allocation,
                           per_layer_noise=per_layer)
    alphas = [1.0 + (amax - 1.0) * x for x in u[:m]]
    clips = {g: d for g, (d, _) in groups.items()}
    cal = calibrate(settings, {g: n for g, (_, n) in groups.items()}, clips, alphas)
    realized = s_alpha("realized", m, 1.0, amax, alphas)
    mu = math.sqrt(rounds * realized * sum((2 * c) ** 2 / cal.sigma_for(g) ** 2 for g, c in clips.items()))
    got, _ = epsilon_for(mu, settings.dp_delta, conversion, DEFAULT_RDP_ORDERS)
    assert got <= eps + 1e-9
