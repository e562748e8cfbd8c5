"""The analytic Gaussian mechanism: the exact (ε, δ) curve (Balle & Wang 2018, Thm. 8).

For the Gaussian mechanism with μ = sensitivity/σ the tight privacy profile is

    δ(ε; μ) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2),

decreasing in ε and increasing in μ. It is evaluated in log space with `scipy.special.log_ndtr`:

    log δ = log Φ(a) + log(1 − exp(ε + log Φ(b) − log Φ(a))),  a = −ε/μ + μ/2,  b = −ε/μ − μ/2.

Compositions of Gaussian mechanisms are again Gaussian with μ² adding (Dong, Roth & Su 2019), so
the curve is exact for R rounds too. `epsilon_exact` and `max_mu_exact` invert it with brentq.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr

__all__ = ["log_delta_exact", "delta_exact", "epsilon_exact", "max_mu_exact"]

_XTOL = 1e-15
_RTOL = 4 * 2.0 ** -52


def log_delta_exact(eps: float, mu: float) -> float:
    """log δ(ε; μ); −∞ for μ = 0, 0 for μ = ∞."""
    if not mu >= 0 or not eps >= 0:
        raise ValueError(f"mu and eps must be ≥ 0 (got mu={mu!r}, eps={eps!r})")
    if mu == 0:
        return -math.inf
    if math.isinf(mu):
        return 0.0
    if math.isinf(eps):
        return -math.inf
    log_a = float(log_ndtr(-eps / mu + mu / 2))
    log_b = eps + float(log_ndtr(-eps / mu - mu / 2))
    if log_b >= log_a:  # only rounding can get here: δ is positive in exact arithmetic
        return -math.inf
    return log_a + math.log1p(-math.exp(log_b - log_a))


def delta_exact(eps: float, mu: float) -> float:
    """δ(ε; μ) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2)."""
    return math.exp(log_delta_exact(eps, mu))


def epsilon_exact(mu: float, delta: float) -> float:
    """The smallest ε ≥ 0 with δ(ε; μ) ≤ δ (∞ for μ = ∞, 0 when δ(0; μ) ≤ δ already)."""
    _check_delta(delta)
    if not mu >= 0:
        raise ValueError(f"mu must be ≥ 0 (got {mu!r})")
    if math.isinf(mu):
        return math.inf
    target = math.log(delta)
    f = lambda e: log_delta_exact(e, mu) - target  # noqa: E731  (decreasing in ε)
    if f(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while f(hi) > 0:
        lo, hi = hi, 2.0 * hi
    eps = brentq(f, lo, hi, xtol=_XTOL, rtol=_RTOL)
    if f(eps) > 0:
        eps = min(hi, eps + 2 * _XTOL)
    while f(eps) > 0:  # brentq may land a hair below the root: step up so δ(ε) ≤ δ holds
        eps = math.nextafter(eps, math.inf)
    return eps


def max_mu_exact(eps: float, delta: float) -> float:
    """The largest μ with δ(ε; μ) ≤ δ, i.e. the calibration σ = sensitivity/μ* (∞ for ε = ∞)."""
    _check_delta(delta)
    if not eps >= 0:
        raise ValueError(f"eps must be ≥ 0 (got {eps!r})")
    if math.isinf(eps):
        return math.inf
    target = math.log(delta)
    f = lambda m: log_delta_exact(eps, m) - target  # noqa: E731  (increasing in μ)
    lo, hi = 0.0, 1.0
    while f(hi) < 0:
        lo, hi = hi, 2.0 * hi
    mu = brentq(f, lo, hi, xtol=_XTOL, rtol=_RTOL)
    if f(mu) > 0:
        mu = max(lo, mu - 2 * _XTOL)
    while mu > 0 and f(mu) > 0:  # never overshoot: step down until δ(ε; μ) ≤ δ
        mu = math.nextafter(mu, 0.0)
    return mu


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (got {delta!r})")
