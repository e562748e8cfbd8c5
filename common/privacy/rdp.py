"""Rényi DP of the Gaussian mechanism and its conversion to (ε, δ) (DESIGN.md §5).

The noise level is given as μ = sensitivity / σ (the inverse of the usual noise multiplier).
The Gaussian mechanism with that μ satisfies, at every order λ > 1 (Mironov 2017, Prop. 7),

    ε_RDP(λ) = λ·μ²/2,

and R compositions add: μ² → Σ_r μ_r². An (ε, δ) guarantee follows from any order λ of a grid:

    improved  ε = ε_RDP(λ) + log((λ−1)/λ) − (log δ + log λ)/(λ−1)
              (Canonne, Kamath & Steinke 2020, Prop. 12; Asoodeh et al. 2020, Eq. 20)
    classic   ε = ε_RDP(λ) + log(1/δ)/(λ−1)                       (Mironov 2017, Prop. 3)

and the best order is the one with the smallest ε. As in Google's `dp-accounting`, a negative
result is reported as 0, and ε = 0 is also claimed whenever the Bretagnolle–Huber bound on the
total variation already gives δ: δ ≥ √(1 − exp(−KL)) with KL ≤ ε_RDP(λ).

Both conversions are ε = λμ²/2 + c(λ) with a constant c(λ) of the order, so the calibration
`max_mu` inverts them in closed form: μ_λ² = 2·(ε − c(λ))/λ where ε > c(λ).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["CONVERSIONS", "conversion_offset", "rdp_gaussian", "rdp_to_epsilon", "epsilon", "max_mu"]


def _improved_offset(orders: np.ndarray, delta: float) -> np.ndarray:
    """c(λ) = log((λ−1)/λ) − (log δ + log λ)/(λ−1)."""
    return np.log1p(-1.0 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1.0)


def _classic_offset(orders: np.ndarray, delta: float) -> np.ndarray:
    """c(λ) = log(1/δ)/(λ−1)."""
    return -math.log(delta) / (orders - 1.0)


# Registry of RDP → (ε, δ) rules: name → c(λ, δ), the offset added to ε_RDP(λ).
CONVERSIONS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "improved": _improved_offset,
    "classic": _classic_offset,
}


def conversion_offset(conversion: str, orders: Sequence[float], delta: float) -> np.ndarray:
    """c(λ) of a named conversion at each order; `ValueError` naming the known ones otherwise."""
    try:
        rule = CONVERSIONS[conversion]
    except KeyError:
        raise ValueError(f"unknown RDP conversion {conversion!r}: use one of {sorted(CONVERSIONS)}") from None
    return rule(_check_orders(orders), _check_delta(delta))


def rdp_gaussian(mu: float, orders: Sequence[float]) -> np.ndarray:
    """ε_RDP(λ) = λ·μ²/2 at each order (μ = ∞ gives ∞, μ = 0 gives 0)."""
    if not mu >= 0:
        raise ValueError(f"mu must be ≥ 0 (got {mu!r})")
    lam = _check_orders(orders)
    return np.full_like(lam, math.inf) if math.isinf(mu) else lam * (mu * mu / 2.0)


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float,
                   conversion: str = "improved") -> tuple[float, float]:
    """(ε, best λ) from RDP values: min over λ of ε_RDP(λ) + c(λ), floored at 0.

    An order whose ε_RDP(λ) ≤ −log(1 − δ²) gives ε = 0 (Bretagnolle–Huber: TV ≤ √(1 − e^(−KL)) ≤ δ).
    """
    lam = _check_orders(orders)
    r = np.asarray(rdp, dtype=float)
    if r.shape != lam.shape:
        raise ValueError(f"rdp and orders must have the same length (got {r.size} and {lam.size})")
    with np.errstate(invalid="ignore"):
        eps = r + conversion_offset(conversion, lam, delta)
    eps = np.where(r <= -math.log1p(-delta * delta), 0.0, eps)
    eps = np.where(np.isnan(eps), math.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(lam[best])


def epsilon(mu: float, delta: float, orders: Sequence[float], conversion: str = "improved") -> tuple[float, float]:
    """(ε, best λ) of the Gaussian mechanism with μ = sensitivity/σ at δ: min_λ λμ²/2 + c(λ)."""
    return rdp_to_epsilon(rdp_gaussian(mu, orders), orders, delta, conversion)


def max_mu(eps: float, delta: float, orders: Sequence[float], conversion: str = "improved") -> tuple[float, float]:
    """(μ*, best λ): the largest μ whose `epsilon(μ, δ)` is ≤ ε.

    Per order μ_λ² = 2·(ε − c(λ))/λ (feasible where ε > c(λ)); the order with the largest μ_λ
    wins. The Bretagnolle–Huber branch gives μ² ≤ −2·log(1 − δ²)/λ_min at any ε ≥ 0. The result
    is nudged down by a few ulps if rounding would put `epsilon(μ*)` above ε. When ε is below every
    c(λ) of the grid only that branch is left (μ* ≈ δ, useless noise): `max_mu` still answers, and
    `calibration.calibrate` warns.
    """
    if not eps >= 0:
        raise ValueError(f"eps must be ≥ 0 (got {eps!r})")
    lam = _check_orders(orders)
    if math.isinf(eps):
        return math.inf, float(lam.min())
    with np.errstate(invalid="ignore"):
        mu2 = 2.0 * (eps - conversion_offset(conversion, lam, delta)) / lam
    mu2 = np.where(mu2 > 0, mu2, 0.0)
    best = int(np.argmax(mu2))
    mu, order = math.sqrt(float(mu2[best])), float(lam[best])
    lam_min = float(lam.min())
    # a 1e-9 margin keeps the (discontinuous) ε = 0 branch robust to rounding in σ = Δ̄/√B
    mu_kl = math.sqrt(-2.0 * math.log1p(-delta * delta) / lam_min) * (1.0 - 1e-9)
    if mu_kl > mu:
        mu, order = mu_kl, lam_min
    for _ in range(64):  # rounding guard: never overshoot ε
        if epsilon(mu, delta, lam, conversion)[0] <= eps:
            break
        mu = math.nextafter(mu, 0.0)
    return mu, order


def _check_orders(orders: Sequence[float]) -> np.ndarray:
    lam = np.atleast_1d(np.asarray(orders, dtype=float))
    if lam.size == 0 or not np.all(lam > 1) or not np.all(np.isfinite(lam)):
        raise ValueError(f"RDP orders must be finite and > 1 (got {list(np.ravel(orders))!r})")
    return lam


def _check_delta(delta: float) -> float:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (got {delta!r})")
    return float(delta)
