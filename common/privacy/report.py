"""The privacy report: what the seed formula claims next to what the release guarantees (DESIGN.md §5).

Three numbers side by side, all at the job's δ:

1. seed formula: the copies treated as independent, μ² = Σ_r S_α,r·Σ_ℓ Δ̄_ℓ²/σ_ℓ² with the
   chosen S_α policy, converted with `dp_conversion`;
2. the true release: all m copies of every round, μ² = Σ_r Σ_ℓ Δ̄_ℓ²·1ᵀΣ_ℓ⁻¹1 (`release`), exact
   conversion;
3. the largest coalition: the worst set of j copies per round, j the most copies one worker
   token received (≤ per_token_copy_cap when a cap is set).

Sensitivities are Δ̄_ℓ = 2·C_ℓ from the clipping norms, else the dp_sensitivity_* settings. With
only a total bound T on ‖v‖, the worst split of v over groups gives μ² = T²·max_ℓ 1ᵀΣ_ℓ⁻¹1 (and
S_α·T²/min σ_ℓ² for the formula).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pum.common.privacy.calibration import epsilon_for, layer_sensitivities, s_alpha
from pum.common.privacy.release import copy_covariance, ones_precision, true_epsilon, true_mu
from pum.common.settings import PumSettings

__all__ = ["privacy_report", "NO_PUBLIC_BASE", "NO_SENSITIVITY", "NO_NOISE", "ZERO_SUM_SMALL_TAU",
           "EXPECTED_POLICY", "OVER_CAP"]

NO_PUBLIC_BASE = ("no sensitivity bound: the center is not clipped relative to a public model, "
                  "so no ε is meaningful")
NO_SENSITIVITY = ("no sensitivity bound: no clipping norm or dp_sensitivity_* setting bounds the center, "
                  "so no ε is meaningful")
NO_NOISE = ("σ_ℓ = 0 for {groups}: those parameters are published without Gaussian noise, "
            "so no ε is meaningful (κ = 0 or σ = 0 is a control run, not a private one)")
ZERO_SUM_SMALL_TAU = ("a party holding all m copies of a round can recover the center: "
                      "no meaningful guarantee against it (raise jitter_tau to about σ, or use independent noise)")
EXPECTED_POLICY = ("dp_alpha_policy 'expected' uses S_α = m/(α_min·α_max): the seed-formula ε is "
                   "an average, not a bound")
OVER_CAP = "a worker token received {j} copies of one round, more than per_token_copy_cap = {cap}"


def _per_round(value: Mapping[str, float] | Sequence[Mapping[str, float]] | None, rounds: int) -> list:
    if value is None or isinstance(value, Mapping):
        return [value] * rounds
    if len(value) != rounds:
        raise ValueError(f"per-round values must cover the {rounds} rounds (got {len(value)})")
    return list(value)


def _round_sensitivity(settings: PumSettings, groups: list[str], clip_norms: Mapping[str, float] | None):
    """('layer', {g: Δ̄_g}) or ('total', T) or (None, None)."""
    sens = layer_sensitivities(settings, groups, clip_norms)
    if sens is not None:
        return "layer", sens
    if settings.dp_sensitivity_total_l2 is not None:
        return "total", float(settings.dp_sensitivity_total_l2)
    return None, None


def _mu2_true(kind, sens, alphas, sigmas, tau, structure, copies) -> float:
    if kind == "layer":
        return true_mu([alphas], sigmas, sens, tau, structure, copies) ** 2
    # total bound T: put all of ‖v‖ on the most exposed group (per-group μ² is linear in Δ̄²)
    return max(true_mu([alphas], sigmas, {g: sens}, tau, structure, copies) ** 2 for g in sigmas)


def _mu2_formula(kind, sens, s, sigmas) -> float:
    if kind == "layer":
        return s * sum(d * d / sigmas[g] ** 2 for g, d in sens.items())
    return s * sens**2 / min(sigmas.values()) ** 2


def _total_variance(sizes: Mapping[str, int] | None, sigmas: Mapping[str, float] | None) -> float | None:
    """Σ_ℓ d_ℓσ_ℓ² of the first round, when every group's size and σ are known."""
    if not sizes or not sigmas or any(g not in sigmas for g in sizes):
        return None
    return sum(d * sigmas[g] ** 2 for g, d in sizes.items())


def privacy_report(settings: PumSettings, group_sizes: Mapping[str, int] | None,
                   clip_norms: Mapping[str, float] | Sequence[Mapping[str, float]] | None,
                   sigmas: Mapping[str, float] | Sequence[Mapping[str, float]],
                   alphas_per_round: Sequence[Sequence[float]], largest_coalition: int | None = None,
                   has_public_base: bool = True) -> dict[str, Any]:
    """The report of a job's released rounds (one α list per round in `alphas_per_round`).

    `sigmas` σ_ℓ and `clip_norms` C_ℓ are keyed by layer group: one mapping for every round, or
    one per round (C_ℓ grows by γ each round). ε values are None where no ε is meaningful
    (no public base, or no sensitivity bound); the warnings say why.
    """
    m, delta, tau, structure = settings.copies_m, settings.dp_delta, settings.jitter_tau, settings.noise_structure
    rounds = len(alphas_per_round)
    sigma_r, clip_r = _per_round(sigmas, rounds), _per_round(clip_norms, rounds)
    cap = settings.per_token_copy_cap
    if largest_coalition is not None:
        j, source = int(largest_coalition), "observed"
    elif cap is not None:
        j, source = min(cap, m), "per_token_copy_cap"
    else:
        j, source = m, "no per_token_copy_cap: one token may receive all m copies"
    warnings: list[str] = []
    if not has_public_base:
        warnings.append(NO_PUBLIC_BASE)
    if cap is not None and j > cap:
        warnings.append(OVER_CAP.format(j=j, cap=cap))

    noiseless = sorted({g for sig in sigma_r for g, sg in sig.items() if sg <= 0})
    if noiseless:
        warnings.append(NO_NOISE.format(groups=", ".join(noiseless)))

    formula2 = true2 = coal2 = 0.0
    unit_true2 = unit_formula2 = 0.0  # the same with Δ̄_ℓ = 1, to judge τ when no sensitivity is known
    s_alphas, bounded = [], True
    for alphas, sig, clips in zip(alphas_per_round, sigma_r, clip_r):
        s = s_alpha(settings.dp_alpha_policy, m, settings.alpha_min, settings.alpha_max, alphas)
        s_alphas.append(s)
        if noiseless:  # every μ below divides by σ_ℓ
            continue
        kind, sens = _round_sensitivity(settings, list(sig), clips)
        if kind is None:
            bounded = False
        else:
            formula2 += _mu2_formula(kind, sens, s, sig)
            true2 += _mu2_true(kind, sens, alphas, sig, tau, structure, None)
            coal2 += _mu2_true(kind, sens, alphas, sig, tau, structure, min(j, m))
        unit_formula2 += _mu2_formula("total", 1.0, s, sig)
        unit_true2 += max(ones_precision(copy_covariance(alphas, sg, tau, structure)) for sg in sig.values())
    if not bounded:
        warnings.append(NO_SENSITIVITY)
    meaningful = has_public_base and bounded and not noiseless
    if structure == "zero_sum" and rounds and not noiseless and (tau == 0 or unit_true2 > 2.0 * unit_formula2):
        warnings.append(ZERO_SUM_SMALL_TAU)
    if settings.dp_alpha_policy == "expected":
        warnings.append(EXPECTED_POLICY)

    def mu(v: float) -> float | None:
        return math.sqrt(v) if meaningful else None

    f_eps, f_order = epsilon_for(math.sqrt(formula2), delta, settings.dp_conversion, settings.dp_rdp_orders) \
        if meaningful else (None, None)
    return {
        "delta": delta,
        "rounds": rounds,
        "rounds_planned": settings.rounds_R,
        "copies_m": m,
        "noise_structure": structure,
        "sigmas": sigmas if isinstance(sigmas, Mapping) else list(sigmas),
        "tau": tau,
        "noise_total_variance": _total_variance(group_sizes, sigma_r[0] if rounds else None),
        "meaningful": meaningful,
        "seed_formula": {
            "epsilon": f_eps, "delta": delta, "mu": mu(formula2), "conversion": settings.dp_conversion,
            "order": f_order, "alpha_policy": settings.dp_alpha_policy, "s_alpha": s_alphas,
            "is_bound": settings.dp_alpha_policy != "expected",
            "assumes": "the m copies are independent Gaussian releases",
        },
        "true_release": {
            "epsilon": true_epsilon(math.sqrt(true2), delta) if meaningful else None, "delta": delta,
            "mu": mu(true2), "copies": m, "conversion": "exact",
        },
        "largest_coalition": {
            "epsilon": true_epsilon(math.sqrt(coal2), delta) if meaningful else None, "delta": delta,
            "mu": mu(coal2), "copies": min(j, m), "source": source, "conversion": "exact",
        },
        "warnings": warnings,
    }
