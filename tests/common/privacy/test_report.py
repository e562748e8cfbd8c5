"""The privacy report: seed formula, true release and largest coalition side by side (DESIGN.md §5)."""

from __future__ import annotations

import json
import math

import pytest

from pum.common.privacy.calibration import calibrate
from pum.common.privacy.report import (
    EXPECTED_POLICY, NO_NOISE, NO_PUBLIC_BASE, NO_SENSITIVITY, OVER_CAP, ZERO_SUM_SMALL_TAU, privacy_report,
)
from pum.common.settings import PumSettings

SIZES = {"layer.0": 1000, "layer.1": 4000, "global": 20000}
CLIPS = {"layer.0": 1.0, "layer.1": 2.0, "global": 0.5}
ALPHAS = [[1.1, 1.4, 1.7, 1.9], [1.2, 1.3, 1.8, 1.6]]


def report_for(**knobs):
    settings = PumSettings(dp_epsilon=4.0, rounds_R=2, copies_m=4, **knobs)
    cal = calibrate(settings, SIZES, CLIPS, ALPHAS[0])
    return privacy_report(settings, SIZES, CLIPS, cal.sigmas, ALPHAS, largest_coalition=None, has_public_base=True)


def test_zero_sum_without_jitter_reports_no_guarantee():
    report = report_for()
    assert report["seed_formula"]["epsilon"] == pytest.approx(4.0, abs=1e-9)
    assert report["true_release"]["epsilon"] == math.inf and report["true_release"]["copies"] == 4
    assert report["largest_coalition"]["copies"] == 4 and report["largest_coalition"]["epsilon"] == math.inf
    assert ZERO_SUM_SMALL_TAU in report["warnings"]
    assert report["tau"] == 0.0 and set(report["sigmas"]) == set(SIZES)
    json.dumps(report)  # JSON-able (∞ as Infinity)


def test_independent_noise_true_epsilon_is_below_the_worstcase_formula():
    report = report_for(noise_structure="independent")
    assert report["true_release"]["epsilon"] <= report["seed_formula"]["epsilon"]
    assert not report["warnings"] and report["meaningful"]


def test_independent_realized_exact_formula_equals_the_true_release():
    settings = PumSettings(dp_epsilon=4.0, rounds_R=2, noise_structure="independent", dp_alpha_policy="realized",
                           dp_conversion="exact")
    sigmas = {g: 3.0 for g in SIZES}
    report = privacy_report(settings, SIZES, CLIPS, sigmas, ALPHAS, None, True)
    assert report["true_release"]["mu"] == pytest.approx(report["seed_formula"]["mu"], rel=1e-12)
    assert report["true_release"]["epsilon"] == pytest.approx(report["seed_formula"]["epsilon"], rel=1e-9)


def test_per_token_cap_bounds_the_coalition():
    report = report_for(jitter_tau=0.5, per_token_copy_cap=2)
    coalition = report["largest_coalition"]
    assert coalition["copies"] == 2 and coalition["source"] == "per_token_copy_cap"
    assert math.isfinite(coalition["epsilon"]) and coalition["epsilon"] <= report["true_release"]["epsilon"]
    settings = PumSettings(dp_epsilon=4.0, rounds_R=2, per_token_copy_cap=2)
    observed = privacy_report(settings, SIZES, CLIPS, {g: 3.0 for g in SIZES}, ALPHAS, 3, True)
    assert observed["largest_coalition"]["copies"] == 3 and OVER_CAP.format(j=3, cap=2) in observed["warnings"]


def test_no_public_base_means_no_meaningful_epsilon():
    settings = PumSettings(dp_epsilon=4.0, rounds_R=2, noise_structure="independent")
    report = privacy_report(settings, SIZES, CLIPS, {g: 3.0 for g in SIZES}, ALPHAS, 1, has_public_base=False)
    assert NO_PUBLIC_BASE in report["warnings"] and not report["meaningful"]
    assert report["seed_formula"]["epsilon"] is None and report["true_release"]["epsilon"] is None


def test_no_sensitivity_means_no_meaningful_epsilon_but_still_judges_tau():
    settings = PumSettings(sigma=0.01)
    report = privacy_report(settings, SIZES, None, {g: 0.01 for g in SIZES}, ALPHAS, None, True)
    assert NO_SENSITIVITY in report["warnings"] and ZERO_SUM_SMALL_TAU in report["warnings"]
    assert report["true_release"]["epsilon"] is None
    ok = privacy_report(PumSettings(sigma=0.01, jitter_tau=0.02), SIZES, None, {g: 0.01 for g in SIZES}, ALPHAS,
                        None, True)
    assert ZERO_SUM_SMALL_TAU not in ok["warnings"]


def test_a_group_without_noise_means_no_meaningful_epsilon_and_no_division_by_zero():
    # κ = 0 (a control run) gives σ_ℓ = 0 everywhere; a manual per-layer σ may leave out one group.
    settings = PumSettings(noise_kappa=0.0, dp_sensitivity_total_l2=1.0, jitter_tau=0.01)
    sigmas = {"layer.0": 0.0, "layer.1": 0.5, "global": 0.0}
    report = privacy_report(settings, SIZES, None, sigmas, ALPHAS, None, True)
    assert NO_NOISE.format(groups="global, layer.0") in report["warnings"] and not report["meaningful"]
    assert report["true_release"]["epsilon"] is None and report["largest_coalition"]["mu"] is None
    assert report["noise_total_variance"] == pytest.approx(4000 * 0.25)


def test_total_sensitivity_bound_puts_everything_on_the_most_exposed_group():
    settings = PumSettings(dp_epsilon=4.0, noise_structure="independent", dp_sensitivity_total_l2=2.0,
                           dp_alpha_policy="realized", rounds_R=1)
    sigmas = {"layer.0": 1.0, "global": 4.0}
    report = privacy_report(settings, None, None, sigmas, ALPHAS[:1], None, True)
    s = sum(1 / a**2 for a in ALPHAS[0])
    assert report["true_release"]["mu"] == pytest.approx(math.sqrt(s * 4.0 / 1.0))
    assert report["seed_formula"]["mu"] == pytest.approx(math.sqrt(s * 4.0 / 1.0))


def test_expected_policy_is_flagged_as_an_average():
    report = report_for(dp_use_worstcase_alpha=False, jitter_tau=10.0)
    assert EXPECTED_POLICY in report["warnings"] and report["seed_formula"]["is_bound"] is False


def test_per_round_clip_norms_and_sigmas():
    settings = PumSettings(dp_epsilon=4.0, rounds_R=2, noise_structure="independent", dp_alpha_policy="realized",
                           dp_conversion="exact")
    grown = {g: 1.3 * c for g, c in CLIPS.items()}
    sig = {g: 3.0 for g in SIZES}
    report = privacy_report(settings, SIZES, [CLIPS, grown], [sig, sig], ALPHAS, None, True)
    one = privacy_report(settings, SIZES, CLIPS, sig, ALPHAS[:1], None, True)["true_release"]["mu"]
    two = privacy_report(settings, SIZES, grown, sig, ALPHAS[1:], None, True)["true_release"]["mu"]
    assert report["true_release"]["mu"] == pytest.approx(math.hypot(one, two))
    with pytest.raises(ValueError, match="cover the 2 rounds"):
        privacy_report(settings, SIZES, [CLIPS], sig, ALPHAS, None, True)
