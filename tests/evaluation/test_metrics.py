"""The metrics of DESIGN.md §7 on hand-made numbers, plus the laws they obey for all inputs."""

import math
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import hmean, ks_2samp

from pum.evaluation import metrics

finite = st.floats(min_value=-50, max_value=50, allow_nan=False)


# ---------------------------------------------------------------- probabilities and truth ratio


def test_mean_prob_is_the_per_token_geometric_mean():
    assert metrics.mean_prob(3 * math.log(2), 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="n_tokens"):
        metrics.mean_prob(1.0, 0)


def test_truth_ratio_by_hand():
    # P̄(â) = 0.5; P̄(ã) = 0.25 and 0.0625 → geometric mean 0.125 → TR = 0.125 / 0.5
    assert metrics.truth_ratio(math.log(2), [math.log(4), math.log(16)]) == pytest.approx(0.25)
    # five perturbed answers as likely as the paraphrase → TR = 1
    assert metrics.truth_ratio(1.3, [1.3] * 5) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        metrics.truth_ratio(1.0, [])


def test_truth_ratio_aggregates_by_hand():
    ratios = [0.25, 4.0, 1.0]
    assert metrics.forget_truth_ratio(ratios) == pytest.approx((0.25 + 0.25 + 1) / 3)
    assert metrics.utility_truth_ratio(ratios) == pytest.approx((0.75 + 0 + 0) / 3)
    assert metrics.normalised_prob(0.5, [0.25, 0.25]) == pytest.approx(0.5)


@given(st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=20))
def test_forget_truth_ratio_is_symmetric_in_tr_and_its_inverse(ratios):
    value = metrics.forget_truth_ratio(ratios)
    assert 0 < value <= 1
    assert metrics.forget_truth_ratio([1 / r for r in ratios]) == pytest.approx(value)


# ---------------------------------------------------------------- KS test and its floors


def test_ks_pvalue_for_fully_separated_small_samples_is_two_over_binomial():
    # exact null distribution: 2 of the C(6,3) = 20 interleavings have D = 1
    assert metrics.ks_pvalue([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / math.comb(6, 3))
    assert metrics.ks_pvalue([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0


def test_ks_pvalue_matches_scipys_exact_value():
    a, b = [0.1, 0.4, 0.7, 1.2, 2.0], [0.2, 0.3, 0.9, 1.0, 3.5, 4.0]
    assert metrics.ks_pvalue(a, b) == pytest.approx(ks_2samp(a, b, method="exact").pvalue, rel=1e-12)
    with pytest.raises(ValueError):
        metrics.ks_pvalue([], [1.0])


@pytest.mark.parametrize("n, floor", [(40, 1.86e-23), (200, 1.94e-119), (400, 1.06e-239)])
def test_ks_floors_reproduced_from_fully_separated_samples(n, floor):
    """DESIGN.md §7's floors: the p-value of ks_2samp on two fully separated samples of size n."""
    separated = metrics.ks_pvalue(np.arange(n), np.arange(n) + 10 * n)
    assert separated == pytest.approx(floor, rel=5e-3)
    assert metrics.ks_floor(n) == pytest.approx(separated, rel=1e-12)
    assert metrics.is_ks_floor(separated, n)
    overlapping = metrics.ks_pvalue(np.arange(n), np.arange(n) + n - 1)  # one shared value
    assert overlapping > floor and not metrics.is_ks_floor(overlapping, n)


def test_ks_floor_for_unequal_sizes_is_two_over_binomial():
    assert metrics.ks_floor(3, 4) == pytest.approx(2 / math.comb(7, 3))


# ---------------------------------------------------------------- model utility


def test_harmonic_mean_by_hand():
    assert metrics.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert metrics.harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError, match="≥ 0"):
        metrics.harmonic_mean([0.5, -0.1])
    with pytest.raises(ValueError):
        metrics.harmonic_mean([])


@given(st.lists(st.floats(min_value=1e-6, max_value=1.0), min_size=1, max_size=9))
def test_harmonic_mean_agrees_with_scipy_and_sits_between_min_and_mean(values):
    h = metrics.harmonic_mean(values)
    assert h == pytest.approx(hmean(values), rel=1e-9)
    assert min(values) * (1 - 1e-9) <= h <= np.mean(values) * (1 + 1e-9)


def test_model_utility_leaves_missing_components_out_and_names_them():
    full = {f"c{i}": v for i, v in enumerate([1.0, 0.5, 0.25, 1.0, 0.5, 0.25, 1.0, 0.5, 0.25])}
    assert metrics.model_utility(full) == (pytest.approx(3 / 7), [])
    partial = {**full, "c3": None, "c4": float("nan")}
    value, missing = metrics.model_utility(partial)
    assert missing == ["c3", "c4"]
    assert value == pytest.approx(metrics.harmonic_mean([1.0, 0.5, 0.25, 0.25, 1.0, 0.5, 0.25]))
    assert metrics.model_utility({"a": None}) == (None, ["a"])


# ---------------------------------------------------------------- membership inference


def test_min_k_by_hand():
    # k = 0.4 of 5 tokens → the 2 lowest log-probs, −5 and −4
    assert metrics.mia_min_k([-1, -5, -3, -2, -4]) == pytest.approx(4.5)
    assert metrics.mia_min_k([-2.0]) == pytest.approx(2.0)  # at least one token
    assert metrics.mia_min_k([-1, -5, -3, -2, -4], k=1.0) == pytest.approx(3.0)  # k = 1: the loss
    with pytest.raises(ValueError):
        metrics.mia_min_k([-1.0], k=0.0)


def test_min_k_plus_plus_by_hand():
    # z = (−1 + 1.5)/0.5 = 1 and (−2 + 1.5)/1 = −0.5; k = 0.5 of 2 tokens keeps −0.5
    assert metrics.mia_min_k_plus_plus([-1, -2], [-1.5, -1.5], [0.5, 1.0], k=0.5) == pytest.approx(0.5)
    # a degenerate distribution (σ = 0) is standardised by the variance floor, not divided by zero
    assert metrics.mia_min_k_plus_plus([-1.0], [-1.0 - 1e-3], [0.0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="one value per token"):
        metrics.mia_min_k_plus_plus([-1, -2], [-1.5], [0.5, 1.0])


def test_zlib_by_hand():
    assert len(zlib.compress(b"aaaa")) == 12
    assert metrics.mia_zlib(2.4, "aaaa") == pytest.approx(0.2)
    assert metrics.mia_loss(1.7) == 1.7


def test_auc_by_hand():
    # pairs (holdout > forget): 0.35>0.1, 0.8>0.1, 0.8>0.4 → 3 of 4
    assert metrics.auc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.75)
    # a tie counts one half: (2>1) + ½(2=2) + (3>1) + (3>2) = 3.5 of 4
    assert metrics.auc([1, 2], [2, 3]) == pytest.approx(0.875)
    assert metrics.auc([1, 2], [3, 4]) == 1.0 and metrics.auc([3, 4], [1, 2]) == 0.0


@given(st.lists(finite, min_size=1, max_size=12), st.lists(finite, min_size=1, max_size=12))
def test_auc_is_the_pairwise_win_rate(forget, holdout):
    wins = sum((h > f) + 0.5 * (h == f) for f in forget for h in holdout)
    assert metrics.auc(forget, holdout) == pytest.approx(wins / (len(forget) * len(holdout)))
    assert metrics.auc(forget, holdout) + metrics.auc(holdout, forget) == pytest.approx(1.0)


def test_privleak_by_hand():
    assert metrics.privleak(0.5, 0.5) == 0.0  # leaks like the retain model
    assert metrics.privleak(1.0, 0.5) == pytest.approx(-100.0)  # forget set fully recognisable
    assert metrics.privleak(0.25, 0.5) == pytest.approx(50.0)  # over-unlearned
    assert metrics.privleak(0.8, 0.6) == pytest.approx((0.2 - 0.4) / 0.4 * 100)
    with pytest.raises(ValueError, match="undefined"):
        metrics.privleak(0.7, 1.0)


# ---------------------------------------------------------------- extraction strength


@pytest.mark.parametrize("matches, expected", [
    ([True, True, True], 1.0),
    ([False, True, True, True], 0.75),
    ([True, False, True, True], 0.5),
    ([True, True, False], 0.0),
    ([False], 0.0),
])
def test_extraction_strength_by_hand(matches, expected):
    assert metrics.extraction_strength(matches) == pytest.approx(expected)


@settings(max_examples=200)
@given(st.lists(st.booleans(), min_size=1, max_size=30))
def test_extraction_strength_is_one_minus_the_shortest_sufficient_prefix(matches):
    n = len(matches)
    k_star = min(k for k in range(n + 1) if all(matches[k:]))
    assert metrics.extraction_strength(matches) == pytest.approx(1 - k_star / n)
