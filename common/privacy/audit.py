"""Attacks that check the accounting: estimate the center from all copies of a round without α.

A party holding copies x_1..x_m of a round (each center + noise_k) combines them linearly with
weights summing to one; the best it can do is the generalised-least-squares combination

    w = Σ⁻¹1 / (1ᵀΣ⁻¹1),   error std per coordinate (1ᵀΣ⁻¹1)^(−1/2)   (the floor, `release`),

with Σ the m×m noise covariance of a coordinate. Two ways to get Σ without α:

- min_variance: Ĉ = X·Xᵀ/n, the copies' empirical second moment (minus a public `reference` when
  given). The center adds c·11ᵀ, which does not move the minimiser under 1ᵀw = 1, but its chance
  correlation with the noise over n coordinates leaves a residual ≈ RMS(center − reference)·√((m−1)/n).
- center_free: the center cancels in every difference x_k − x_j, so D_kj = mean (x_k − x_j)² is
  fitted by the covariance model of the noise structure (public), with β_k = σ·α_k and t = τ²:

      zero_sum     D_kj = β_k² + β_j² + 2·β_k·β_j/(m−1) + 2t    (Σ_kk = β_k² + t, Σ_kj = −β_kβ_j/(m−1))
      independent  D_kj = v_k + v_j                            (Σ = diag(v), v_k = β_k² + t)

  then w = GLS weights of the fitted Σ̂ (for zero-sum with t̂ = 0 this is w ∝ 1/β̂, which cancels
  the zero-sum noise exactly). It needs m ≥ 3 (zero-sum with jitter: m ≥ 4; with m = 3 it fits t = 0).

Σ̂ may be singular (zero-sum, τ = 0): weights are solved from the KKT system [[Σ̂, 1], [1ᵀ, 0]] by
least squares, well posed whenever Σ̂ is positive on {1ᵀw = 0}. `audit` runs every attack and
reports each, the strongest first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import least_squares

__all__ = ["ATTACKS", "audit", "center_free_weights", "estimate_center", "gls_weights", "min_variance_weights",
           "noise_covariance_from_differences"]


def _as_matrix(copies: Sequence[Any], reference: Any | None = None) -> np.ndarray:
    """m×n float64 matrix of flattened copies (numpy arrays or torch tensors), minus `reference`."""
    if len(copies) < 2:
        raise ValueError(f"need at least two copies to combine (got {len(copies)})")
    rows = [_flat(c) for c in copies]
    if len({r.size for r in rows}) != 1:
        raise ValueError(f"copies must have the same number of elements (got {[r.size for r in rows]})")
    x = np.stack(rows)
    return x - _flat(reference)[None, :] if reference is not None else x


def _flat(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch.Tensor, without importing torch here
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64).ravel()


def gls_weights(cov: np.ndarray) -> np.ndarray:
    """w = argmin wᵀΣw subject to 1ᵀw = 1, from the KKT system (Σ may be singular)."""
    m = cov.shape[0]
    scale = float(np.trace(cov)) / m or 1.0
    kkt = np.zeros((m + 1, m + 1))
    kkt[:m, :m] = cov / scale
    kkt[:m, m] = kkt[m, :m] = 1.0
    rhs = np.zeros(m + 1)
    rhs[m] = 1.0
    w = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:m]
    return w / w.sum()


def min_variance_weights(copies: Sequence[Any], reference: Any | None = None) -> np.ndarray:
    """GLS weights of Ĉ = X·Xᵀ/n of the copies minus `reference`."""
    x = _as_matrix(copies, reference)
    return gls_weights(x @ x.T / x.shape[1])


def _pairwise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k, j, D̂_kj) over the pairs k < j."""
    k, j = np.triu_indices(x.shape[0], 1)
    return k, j, np.array([np.mean((x[a] - x[b]) ** 2) for a, b in zip(k, j)])


def noise_covariance_from_differences(copies: Sequence[Any], structure: str) -> np.ndarray | None:
    """Σ̂ fitted to the pairwise differences of the copies (module docstring); None when m is too small."""
    x = _as_matrix(copies)
    m = x.shape[0]
    if m < 3:
        return None
    k, j, d = _pairwise(x)
    pairs = np.zeros((d.size, m))
    pairs[np.arange(d.size), k] = pairs[np.arange(d.size), j] = 1.0
    v = np.clip(np.linalg.lstsq(pairs, d, rcond=None)[0], 1e-30, None)  # D ≈ v_k + v_j
    if structure == "independent":
        return np.diag(v)
    if structure != "zero_sum":
        raise ValueError(f"unknown noise structure {structure!r}: use one of ['independent', 'zero_sum']")
    with_jitter = d.size > m  # m ≥ 4: enough pairs for β and t
    scale = float(d.mean())

    def unpack(p: np.ndarray) -> tuple[np.ndarray, float]:
        p = np.clip(p, -700.0, 700.0)  # log-parameters: keep exp finite while the solver explores
        return np.exp(p[:m]), (float(np.exp(p[m])) if with_jitter else 0.0)

    def residual(p: np.ndarray) -> np.ndarray:
        beta, t = unpack(p)
        return (beta[k] ** 2 + beta[j] ** 2 + 2 * beta[k] * beta[j] / (m - 1) + 2 * t - d) / scale

    start = np.log(np.sqrt(v))
    if with_jitter:
        start = np.append(start, math.log(0.01 * float(v.mean())))
    beta, t = unpack(least_squares(residual, start, xtol=1e-14, ftol=1e-14).x)
    cov = -np.outer(beta, beta) / (m - 1)
    np.fill_diagonal(cov, beta**2)
    return cov + t * np.eye(m)


def center_free_weights(copies: Sequence[Any], structure: str) -> np.ndarray | None:
    """GLS weights of the Σ̂ fitted from pairwise differences (None when m is too small)."""
    cov = noise_covariance_from_differences(copies, structure)
    return None if cov is None else gls_weights(cov)


def estimate_center(copies: Sequence[Any], reference: Any | None = None) -> np.ndarray:
    """Σ_k w_k·copy_k with the min-variance weights (float64, the copies' flattened shape restored
    from the first copy). `reference`, when given, is only used to estimate w."""
    w = min_variance_weights(copies, reference)
    x = _as_matrix(copies)
    first = copies[0]
    return (w @ x).reshape(tuple(first.shape) if hasattr(first, "shape") else np.shape(first))


# name → (copies, reference, structure) → weights or None (not applicable)
ATTACKS = {
    "min_variance": lambda copies, reference, structure: min_variance_weights(copies, reference),
    "center_free": lambda copies, reference, structure: center_free_weights(copies, structure),
}


def audit(copies: Sequence[Any], true_center: Any, reference: Any | None = None, structure: str = "zero_sum",
          floor_rmse: float | None = None) -> dict[str, Any]:
    """How well each attack recovers the center, against the copies' own noise and the floor.

    Per attack: weights, rmse of its estimate, relative_error = rmse / per_copy_noise_rms (≈ 0:
    the noise cancels, no protection from this coalition; None when the copies carry no noise). Top level: the strongest attack (lowest
    rmse), its rmse and relative_error, mean_rmse (the plain mean, which does not cancel),
    per_copy_noise_rms, and with `floor_rmse` = (1ᵀΣ⁻¹1)^(−1/2) the ratio rmse / floor (≈ 1 for an
    optimal attack; well below 1 would mean the accounting is wrong).
    """
    x = _as_matrix(copies)
    center = _flat(true_center)
    noise = x - center[None, :]
    per_copy = math.sqrt(float(np.mean(noise**2)))
    attacks = {}
    for name, weights_of in ATTACKS.items():
        w = weights_of(copies, reference, structure)
        if w is None:
            continue
        rmse = math.sqrt(float(np.mean((w @ noise) ** 2)))
        attacks[name] = {"rmse": rmse, "relative_error": rmse / per_copy if per_copy > 0 else None,
                         "weights": [float(v) for v in w]}
    strongest = min(attacks, key=lambda n: attacks[n]["rmse"])
    best = attacks[strongest]
    return {
        "copies": x.shape[0], "coordinates": x.shape[1],
        "strongest": strongest, "rmse": best["rmse"], "relative_error": best["relative_error"],
        "weights": best["weights"],
        "floor_rmse": floor_rmse,
        "rmse_over_floor": best["rmse"] / floor_rmse if floor_rmse else None,
        "mean_rmse": math.sqrt(float(np.mean(noise.mean(axis=0) ** 2))),
        "per_copy_noise_rms": per_copy,
        "attacks": attacks,
    }
