"""The privacy report: headline true ε, seed formula, true release, largest coalition (DESIGN.md §5)."""

from __future__ import annotations

import json
import math

import pytest

from pum.common.privacy.calibration import calibrate
from pum.common.privacy.report import (
    EVERY_COPY, EXPECTED_POLICY, NO_CLIPPING, NO_NOISE, NO_PUBLIC_BASE, RELATIVE_NOISE, UNCLIPPED_GROUPS,
    ZERO_SUM_SMALL_TAU, Coalition, RoundRelease, privacy_report,
)
from pum.common.privacy.target import calibrate_round
from pum.common.settings import PumSettings

SIZES = {"layer.0": 1000, "layer.1": 4000, "global": 20000}
CLIPS = {"layer.0": 1.0, "layer.1": 2.0, "global": 0.5}
ALPHAS = [[1.1, 1.4, 1.7, 1.9], [1.2, 1.3, 1.8, 1.6]]
EVERY = Coalition(4, EVERY_COPY)


def strict_json(report) -> dict:
    """The report as the wire sees it: json.loads refuses NaN and ±Infinity."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(json.dumps(report.to_dict(), allow_nan=False), parse_constant=refuse)


def rounds_of(sigmas, taus=0.0, clips=CLIPS, alphas=ALPHAS):
    taus = taus if isinstance(taus, dict) else dict.fromkeys(sigmas, taus)
    return [RoundRelease(a, sigmas, taus, clips) for a in alphas]


def seed_formula_report(**knobs):
    settings = PumSettings(dp_epsilon=4.0, rounds_R=2, copies_m=4, dp_target="seed_formula", **knobs)
    cal = calibrate(settings, SIZES, CLIPS, ALPHAS[0])
    return privacy_report(settings, rounds_of(cal.sigmas, settings.jitter_tau), EVERY, SIZES, True)


def test_zero_sum_without_jitter_is_unbounded_and_says_so_in_valid_json():
    report = seed_formula_report()
    assert report.seed_formula.epsilon == pytest.approx(4.0, abs=1e-9)
    assert report.seed_formula.is_bound is False  # zero-sum: the formula is no bound for this release
    wire = strict_json(report)
    assert wire["true_release"] == {**wire["true_release"], "epsilon": "inf", "unbounded": True, "mu": "inf"}
    assert wire["epsilon"] == "inf" and wire["unbounded"] and wire["largest_coalition"]["copies"] == 4
    assert ZERO_SUM_SMALL_TAU in report.warnings and report.meaningful


def test_headline_is_the_true_epsilon_of_every_copy_with_the_formula_beside_it():
    settings = PumSettings(dp_epsilon=4.0, rounds_R=2, copies_m=4)
    rounds = []
    for alphas in ALPHAS:
        noise = calibrate_round(settings, SIZES, CLIPS, alphas)
        rounds.append(RoundRelease(alphas, noise.sigmas, noise.taus, CLIPS))
    report = privacy_report(settings, rounds, EVERY, SIZES, True)
    assert 3.9 <= report.epsilon <= 4.0 and report.epsilon == report.true_release.epsilon
    assert "independent" in report.seed_formula.assumes and report.seed_formula.epsilon == pytest.approx(4.0)
    assert report.dp_target == "true_release" and report.calibration == noise.method
    assert report.rounds == 2 and len(report.taus) == 2 and not report.warnings
    assert report.jitter_total_variance == pytest.approx(sum(d * rounds[0].taus[g] ** 2 for g, d in SIZES.items()))


def test_independent_noise_formula_is_a_bound_above_the_true_release():
    report = seed_formula_report(noise_structure="independent")
    assert report.seed_formula.is_bound and report.true_release.epsilon <= report.seed_formula.epsilon
    assert not report.warnings and report.meaningful


def test_independent_realized_exact_formula_equals_the_true_release():
    settings = PumSettings(dp_epsilon=4.0, rounds_R=2, noise_structure="independent", dp_alpha_policy="realized",
                           dp_conversion="exact")
    report = privacy_report(settings, rounds_of({g: 3.0 for g in SIZES}), EVERY, SIZES, True)
    assert report.true_release.mu == pytest.approx(report.seed_formula.mu, rel=1e-12)
    assert report.true_release.epsilon == pytest.approx(report.seed_formula.epsilon, rel=1e-9)


def test_a_party_holding_fewer_copies_gets_a_smaller_epsilon():
    settings = PumSettings(sigma=3.0, jitter_tau=0.5)
    report = privacy_report(settings, rounds_of({g: 3.0 for g in SIZES}, 0.5), Coalition(2, "parties", observed=1),
                            SIZES, True)
    coalition = report.largest_coalition
    assert coalition.copies == 2 and coalition.observed == 1 and coalition.source == "parties"
    assert math.isfinite(coalition.epsilon) and coalition.epsilon < report.true_release.epsilon
    assert report.epsilon == coalition.epsilon  # the headline is the largest party's


@pytest.mark.parametrize("settings, clips, base, reason", [
    (PumSettings(noise_kappa=0.01), CLIPS, True, RELATIVE_NOISE),
    (PumSettings(sigma=3.0, jitter_tau=3.0), None, True, NO_CLIPPING),
    (PumSettings(sigma=3.0, jitter_tau=3.0), {**CLIPS, "global": None}, True, UNCLIPPED_GROUPS.format(groups="global")),
    (PumSettings(sigma=3.0, noise_structure="independent"), CLIPS, False, NO_PUBLIC_BASE),
])
def test_no_epsilon_without_a_data_independent_sensitivity_bound(settings, clips, base, reason):
    report = privacy_report(settings, rounds_of({g: 3.0 for g in SIZES}, settings.jitter_tau, clips), EVERY, SIZES,
                            base)
    assert reason in report.no_epsilon_reasons and not report.meaningful
    wire = strict_json(report)
    for figure in ("seed_formula", "true_release", "largest_coalition"):
        assert wire[figure]["epsilon"] is None and wire[figure]["unbounded"] is False  # null = not computed
    assert wire["epsilon"] is None


def test_manual_sigma_with_clipping_and_a_base_has_an_epsilon():
    report = privacy_report(PumSettings(sigma=3.0, jitter_tau=3.0), rounds_of({g: 3.0 for g in SIZES}, 3.0), EVERY,
                            SIZES, True)
    assert report.meaningful and math.isfinite(report.epsilon) and report.noise_mode == "manual"


def test_a_group_without_noise_means_no_epsilon_and_no_division_by_zero():
    settings = PumSettings(noise_kappa=0.0, jitter_tau=0.0)
    sigmas = {"layer.0": 0.0, "layer.1": 0.5, "global": 0.0}
    report = privacy_report(settings, rounds_of(sigmas), EVERY, SIZES, True)
    assert NO_NOISE.format(groups="global, layer.0") in report.no_epsilon_reasons and not report.meaningful
    assert report.true_release.epsilon is None and report.largest_coalition.mu is None
    assert report.noise_total_variance == pytest.approx(4000 * 0.25)


def test_jitter_alone_is_noise():
    sigmas = {g: 0.0 for g in SIZES}
    report = privacy_report(PumSettings(sigma=0.0, jitter_tau=2.0), rounds_of(sigmas, 2.0), EVERY, SIZES, True)
    assert report.meaningful and report.seed_formula.unbounded and math.isfinite(report.true_release.epsilon)
    # Σ = τ²·I: μ² = Σ_ℓ Δ̄²·m/τ² per round
    mu2 = 2 * sum((2 * c) ** 2 * 4 / 4.0 for c in CLIPS.values())
    assert report.true_release.mu == pytest.approx(math.sqrt(mu2))


def test_expected_policy_is_flagged_as_an_average():
    report = seed_formula_report(dp_use_worstcase_alpha=False, jitter_tau=10.0)
    assert EXPECTED_POLICY in report.warnings and report.seed_formula.is_bound is False


def test_per_round_clip_norms_add_up():
    settings = PumSettings(sigma=3.0, noise_structure="independent", dp_alpha_policy="realized",
                           dp_conversion="exact")
    sig = {g: 3.0 for g in SIZES}
    grown = {g: 1.3 * c for g, c in CLIPS.items()}
    both = [RoundRelease(ALPHAS[0], sig, dict.fromkeys(sig, 0.0), CLIPS),
            RoundRelease(ALPHAS[1], sig, dict.fromkeys(sig, 0.0), grown, opened=False)]
    report = privacy_report(settings, both, EVERY, SIZES, True)
    one = privacy_report(settings, both[:1], EVERY, SIZES, True).true_release.mu
    two = privacy_report(settings, both[1:], EVERY, SIZES, True).true_release.mu
    assert report.true_release.mu == pytest.approx(math.hypot(one, two))
    assert report.rounds == 2 and report.rounds_opened == 1
    assert report.sensitivities[1]["layer.1"] == pytest.approx(2 * 1.3 * 2.0)
