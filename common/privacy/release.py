"""The guarantee of what is actually released: all copies of a round seen together (DESIGN.md §5).

Per coordinate of layer group ℓ, the m copies are center·1 + noise with covariance

    zero_sum     Σ_ℓ = σ_ℓ²·(m/(m−1))·A·P·A + τ²·I,   A = diag(α),  P = I − 11ᵀ/m
    independent  Σ_ℓ = σ_ℓ²·A² + τ²·I.

Neighbouring centers differ by v with ‖v_ℓ‖ ≤ Δ̄_ℓ, and v shifts every copy by the same v, so the
release is a Gaussian mechanism with mean shift v⊗1. Its μ (Mahalanobis length of the shift) is

    μ² = Σ_ℓ Δ̄_ℓ² · 1ᵀ Σ_ℓ⁻¹ 1,

and for a party holding only the copies J ⊂ {1..m}, Σ_JJ replaces Σ. Rounds add μ². Zero-sum with
τ = 0 is singular along A⁻¹1, and 1 is not in the range of Σ (1ᵀA⁻¹1 = S0 ≠ 0): the weighted
sum Σ_k (1/α_k)·copy_k / S0 is the center itself and μ = ∞ (no guarantee). With τ > 0,
1ᵀΣ⁻¹1 ≈ S0²/(S_α·τ²) + …, so τ must be about as large as σ for a meaningful ε. Independent noise
with τ = 0 gives 1ᵀΣ⁻¹1 = S_α/σ², the formula of `calibration`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.linalg

from pum.common.privacy.exact import epsilon_exact

__all__ = ["copy_covariance", "ones_precision", "round_mu_squared", "worst_subset_mu_squared",
           "true_mu", "true_epsilon", "smallest_tau", "MAX_SUBSETS"]

MAX_SUBSETS = 20_000  # past this many subsets of a coalition size, bound by the full release
_NULL_TOL = 1e-13     # eigenvalues below this fraction of the largest count as zero


def copy_covariance(alphas: Sequence[float], sigma: float, tau: float, structure: str) -> np.ndarray:
    """The m×m covariance Σ of one coordinate's noise over the copies (formulas above)."""
    a = np.asarray(alphas, dtype=float)
    m = a.size
    if structure == "zero_sum":
        if m < 2:
            raise ValueError(f"copies_m must be ≥ 2 (got {m}): zero-sum noise needs at least two copies")
        p = np.eye(m) - np.full((m, m), 1.0 / m)
        cov = sigma**2 * (m / (m - 1)) * (a[:, None] * p * a[None, :])
    elif structure == "independent":
        cov = np.diag(sigma**2 * a**2)
    else:
        raise ValueError(f"unknown noise structure {structure!r}: use one of ['independent', 'zero_sum']")
    return cov + tau**2 * np.eye(m)


def ones_precision(cov: np.ndarray, subset: Sequence[int] | None = None) -> float:
    """1ᵀ Σ_JJ⁻¹ 1 (J = `subset`, all copies when None); ∞ when Σ_JJ is singular and 1 has a
    component in its null space (then a combination of the copies has no noise at all)."""
    c = np.asarray(cov, dtype=float)
    if subset is not None:
        idx = list(subset)
        if not idx:
            return 0.0
        c = c[np.ix_(idx, idx)]
    ones = np.ones(c.shape[0])
    scale = float(np.max(np.diag(c)))
    if scale <= 0:
        return math.inf
    c = c / scale
    try:  # positive definite (τ > 0, or independent noise): a Cholesky solve
        factor = scipy.linalg.cho_factor(c, lower=True)
        if np.min(np.diag(factor[0])) ** 2 > _NULL_TOL:
            return float(ones @ scipy.linalg.cho_solve(factor, ones)) / scale
    except np.linalg.LinAlgError:
        pass
    w, u = np.linalg.eigh(c)  # (near-)singular: split off the null space explicitly
    proj = u.T @ ones
    null = w <= _NULL_TOL * max(float(w.max()), 0.0)
    if np.any(null & (proj**2 > 1e-9 * ones.size)):
        return math.inf
    return float(np.sum(proj[~null] ** 2 / w[~null])) / scale


def _tau_of(tau: float | Mapping[str, float], group: str) -> float:
    return float(tau[group]) if isinstance(tau, Mapping) else float(tau)


def round_mu_squared(alphas: Sequence[float], sigmas: Mapping[str, float], sensitivities: Mapping[str, float],
                     tau: float | Mapping[str, float], structure: str, subset: Sequence[int] | None = None) -> float:
    """μ² of one round: Σ_ℓ Δ̄_ℓ²·1ᵀΣ_ℓ,JJ⁻¹1 over the groups of `sensitivities` (each needs a σ_ℓ;
    τ is one jitter for every group or a τ_ℓ per group)."""
    total, cache = 0.0, {}
    for group, sens in sensitivities.items():
        if sens == 0:
            continue
        scales = (float(sigmas[group]), _tau_of(tau, group))
        if scales not in cache:
            cache[scales] = ones_precision(copy_covariance(alphas, *scales, structure), subset)
        total += sens**2 * cache[scales]
    return total


def worst_subset_mu_squared(alphas: Sequence[float], sigmas: Mapping[str, float],
                            sensitivities: Mapping[str, float], tau: float | Mapping[str, float], structure: str,
                            size: int) -> float:
    """max over sets J of `size` copies of one round's μ²_J (a coalition holds the same copies in
    every layer). Past MAX_SUBSETS sets, the full release bounds it (μ² grows with J)."""
    m = len(alphas)
    if size >= m:
        return round_mu_squared(alphas, sigmas, sensitivities, tau, structure)
    if size <= 0:
        return 0.0
    if math.comb(m, size) > MAX_SUBSETS:
        return round_mu_squared(alphas, sigmas, sensitivities, tau, structure)
    return max(round_mu_squared(alphas, sigmas, sensitivities, tau, structure, subset)
               for subset in itertools.combinations(range(m), size))


def true_mu(alphas_per_round: Sequence[Sequence[float]], sigmas: Mapping[str, float],
            sensitivities: Mapping[str, float], tau: float | Mapping[str, float], structure: str,
            copies: int | Sequence[int] | None = None) -> float:
    """μ of the whole run: √(Σ_r μ_r²). `copies`: None = all m copies; an int j = the worst set
    of j copies in each round; a sequence of indices = those copies in every round."""
    total = 0.0
    for alphas in alphas_per_round:
        if isinstance(copies, int):
            total += worst_subset_mu_squared(alphas, sigmas, sensitivities, tau, structure, copies)
        else:
            total += round_mu_squared(alphas, sigmas, sensitivities, tau, structure, copies)
    return math.sqrt(total)


def true_epsilon(mu: float, delta: float) -> float:
    """ε at δ of a Gaussian mechanism with μ, by the exact (analytic Gaussian) conversion."""
    return epsilon_exact(mu, delta)


def smallest_tau(alphas: Sequence[float], sigma: float, sensitivity: float, structure: str, target_mu2: float,
                 tau_min: float = 0.0) -> float:
    """The smallest τ ≥ `tau_min` with Δ̄²·1ᵀΣ(σ, τ)⁻¹1 ≤ `target_mu2`, by bisection.

    Σ(σ, τ) grows with τ in the Loewner order, so 1ᵀΣ⁻¹1 falls monotonically; and Σ ⪰ τ²·I gives
    1ᵀΣ⁻¹1 ≤ m/τ², so τ_hi = Δ̄·√(m/target) always meets the target. The answer is the upper end
    of the final bracket (relative width 1e-13): it never overshoots the target.
    """
    if not target_mu2 > 0:
        raise ValueError(f"target μ² must be > 0 (got {target_mu2!r})")
    excess = lambda t: sensitivity**2 * ones_precision(copy_covariance(alphas, sigma, t, structure)) - target_mu2  # noqa: E731
    if sensitivity == 0 or excess(tau_min) <= 0:
        return tau_min
    lo, hi = tau_min, max(tau_min, sensitivity * math.sqrt(len(alphas) / target_mu2))
    while excess(hi) > 0:  # rounding only: the bound holds in exact arithmetic
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return hi
