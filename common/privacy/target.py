"""The noise of one round for the job's `dp_target`: σ_ℓ and the jitter τ_ℓ (DESIGN.md §5).

    seed_formula  σ_ℓ from `calibration.calibrate`, which treats the m copies as independent;
                  τ_ℓ = jitter_tau. For zero-sum noise this is NOT a bound against a party that holds
                  every copy (`release`): with τ = 0 that party recovers the center exactly.
    true_release  σ_ℓ kept from the same allocation, and per layer group the smallest jitter
                  τ_ℓ ≥ jitter_tau with

                      Δ̄_ℓ²·1ᵀΣ_ℓ(σ_ℓ, τ_ℓ)⁻¹1 ≤ s_ℓ·μ*²/R,   s_ℓ = (Δ̄_ℓ²/σ_ℓ²) / Σ_j Δ̄_j²/σ_j²,

                  μ* the largest μ meeting (ε, δ) by the exact (analytic Gaussian) conversion, s_ℓ the
                  group's share of the allocation. Summed over the groups and the R rounds the true μ²
                  of all m copies of every round is ≤ μ*², so its ε is ≤ dp_epsilon (and within the
                  bisection's 1e-13 of it).

Why σ_ℓ is kept and τ_ℓ solved for, rather than both scaled: Σ = σ²·(m/(m−1))·A·P·A + τ²·I is
singular along A⁻¹1 without jitter, and as σ → ∞ 1ᵀΣ⁻¹1 only falls to S0²/(S_α·τ²) (S0 = Σ 1/α_k),
so σ cannot replace τ; τ carries the guarantee against the party holding every copy. Keeping σ_ℓ
leaves the zero-sum part (which cancels in the merge) as the allocation made it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pum.common.errors import InvalidInput
from pum.common.privacy.calibration import Calibration, calibrate, layer_sensitivities
from pum.common.privacy.exact import max_mu_exact
from pum.common.privacy.release import smallest_tau
from pum.common.settings import PumSettings

__all__ = ["RoundNoise", "calibrate_round", "TRUE_RELEASE_METHOD", "SEED_FORMULA_METHOD"]

TRUE_RELEASE_METHOD = ("true_release: σ_ℓ kept from the allocation, τ_ℓ the smallest jitter (bisection) that puts "
                       "the true μ² of all m copies within each group's share of μ*²/R (exact conversion)")
SEED_FORMULA_METHOD = ("seed_formula: σ_ℓ from the formula that treats the copies as independent; "
                       "τ_ℓ = jitter_tau")


@dataclass(frozen=True)
class RoundNoise:
    """σ_ℓ and τ_ℓ of one round, and how they were chosen."""

    sigmas: dict[str, float]      # σ_ℓ per layer group (std of the zero-sum or independent base noise)
    taus: dict[str, float]        # τ_ℓ per layer group (std of the independent jitter)
    method: str                   # TRUE_RELEASE_METHOD or SEED_FORMULA_METHOD
    calibration: Calibration      # the σ allocation behind `sigmas`


def calibrate_round(settings: PumSettings, group_sizes: Mapping[str, int], clip_norms: Mapping[str, float] | None,
                    alphas: Sequence[float]) -> RoundNoise:
    """σ_ℓ and τ_ℓ for one round with this round's C_ℓ and realized α (see the module docstring)."""
    cal = calibrate(settings, group_sizes, clip_norms, alphas)
    groups = list(group_sizes)
    sigmas = {g: cal.sigma_for(g) for g in groups}
    if settings.dp_target == "seed_formula":
        return RoundNoise(sigmas, dict.fromkeys(groups, settings.jitter_tau), SEED_FORMULA_METHOD, cal)
    sens = layer_sensitivities(settings, groups, clip_norms)
    if sens is None:
        raise InvalidInput("dp_target='true_release' needs a clipping norm C_ℓ for every layer group (set "
                           "center_clip_C_per_layer and center_clip_C_global, or per-layer DP sensitivities)")
    mu_star = max_mu_exact(settings.dp_epsilon, settings.dp_delta)
    round_mu2 = mu_star**2 / settings.rounds_R
    spend = {g: (d / sigmas[g]) ** 2 for g, d in sens.items() if d > 0}
    total = sum(spend.values())
    taus = dict.fromkeys(groups, settings.jitter_tau)
    for g, share in spend.items():
        if math.isinf(total) or math.isinf(round_mu2):  # σ_ℓ = 0 somewhere, or ε = ∞: nothing to solve
            break
        taus[g] = smallest_tau(alphas, sigmas[g], sens[g], settings.noise_structure, round_mu2 * share / total,
                               tau_min=settings.jitter_tau)
    return RoundNoise(sigmas, taus, TRUE_RELEASE_METHOD, cal)
