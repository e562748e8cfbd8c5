"""An attack that checks the accounting: estimate the center from all copies without knowing α.

A party holding copies x_1..x_m of a round (each center + noise_k) combines them linearly with
weights summing to one. The minimum-variance unbiased combination is

    w = Ĉ⁻¹1 / (1ᵀĈ⁻¹1),   Ĉ = the m×m empirical second moment of the copies over coordinates.

The center adds c·11ᵀ to Ĉ, which changes wᵀĈw by the constant c under 1ᵀw = 1, so it does not
move the minimiser. Ĉ is (near-)singular for zero-sum noise with τ = 0, so w is solved from the
KKT system [[Ĉ, 1], [1ᵀ, 0]]·[w; λ] = [0; 1] by least squares, well posed whenever Ĉ is positive
on {1ᵀw = 0}. The attacker's std is then (1ᵀΣ⁻¹1)^(−1/2) (`release.ones_precision`), plus a
residual ≈ RMS(center − reference)·√((m−1)/n) from the chance correlation between the center and
the noise over n coordinates; subtracting a public `reference` (the base model) shrinks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["min_variance_weights", "estimate_center", "audit"]


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


def min_variance_weights(copies: Sequence[Any], reference: Any | None = None) -> np.ndarray:
    """w = argmin wᵀĈw subject to 1ᵀw = 1 (Ĉ = X·Xᵀ/n of the copies minus `reference`)."""
    x = _as_matrix(copies, reference)
    m, n = x.shape
    c = x @ x.T / n
    scale = float(np.trace(c)) / m or 1.0
    kkt = np.zeros((m + 1, m + 1))
    kkt[:m, :m] = c / scale
    kkt[:m, m] = kkt[m, :m] = 1.0
    rhs = np.zeros(m + 1)
    rhs[m] = 1.0
    sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    w = sol[:m]
    return w / w.sum()


def estimate_center(copies: Sequence[Any], reference: Any | None = None) -> np.ndarray:
    """Σ_k w_k·copy_k with the min-variance weights (float64, the copies' flattened shape restored
    from the first copy). `reference`, when given, is only used to estimate w."""
    w = min_variance_weights(copies, reference)
    x = _as_matrix(copies)
    first = copies[0]
    return (w @ x).reshape(tuple(first.shape) if hasattr(first, "shape") else np.shape(first))


def audit(copies: Sequence[Any], true_center: Any, reference: Any | None = None) -> dict[str, Any]:
    """How well the attack recovers the center: its RMS error against the copies' own noise.

    Returns weights, rmse of the estimate, rmse of the plain mean, per_copy_noise_rms
    (√ of the mean over copies of each copy's mean squared noise), and relative_error =
    rmse / per_copy_noise_rms (≈ 0 means the noise cancels: no protection from this coalition).
    """
    w = min_variance_weights(copies, reference)
    x = _as_matrix(copies)
    center = _flat(true_center)
    noise = x - center[None, :]
    rmse = math.sqrt(float(np.mean((w @ noise) ** 2)))
    per_copy = math.sqrt(float(np.mean(noise**2)))
    return {
        "copies": x.shape[0],
        "coordinates": x.shape[1],
        "weights": [float(v) for v in w],
        "rmse": rmse,
        "mean_rmse": math.sqrt(float(np.mean(noise.mean(axis=0) ** 2))),
        "per_copy_noise_rms": per_copy,
        "relative_error": rmse / per_copy if per_copy > 0 else math.inf,
    }
