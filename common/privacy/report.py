"""The privacy report: what a job's release guarantees, next to what the seed formula claims (DESIGN.md §5).

Figures, all at the job's δ and over every round of the job (R rounds add μ²):

1. headline: the true ε against the largest party, by default the data owner holding every
   copy of every round (all worker tokens of a job are one data owner unless the admin groups
   them into parties);
2. seed formula: the copies treated as independent, μ² = Σ_r S_α,r·Σ_ℓ Δ̄_ℓ²/σ_ℓ², converted
   with `dp_conversion`; a bound only for independent noise and a worst-case or realized S_α;
3. true release: all m copies, μ² = Σ_r Σ_ℓ Δ̄_ℓ²·1ᵀΣ_ℓ⁻¹1 (`release`), exact conversion;
4. largest coalition: the worst set of j copies per round, j the most copies one party may hold.

Δ̄_ℓ = 2·C_ℓ from the round's center clipping norms. No ε is computed (the reasons say why) when
the noise is relative (σ_ℓ = κ·RMS(θ_ℓ − θ_base,ℓ) is a function of the private model), when the
center is not clipped in every group (nothing bounds its sensitivity), without a public base, or
when a group gets no noise. An infinite ε is written "inf" with `unbounded: true`; null always
means "not computed". The report is plain data (dataclasses of JSON types) so it serialises with
`json.dumps(..., allow_nan=False)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pum.common.privacy.calibration import epsilon_for, s_alpha
from pum.common.privacy.release import copy_covariance, ones_precision, round_mu_squared, true_epsilon, \
    worst_subset_mu_squared
from pum.common.privacy.target import SEED_FORMULA_METHOD, TRUE_RELEASE_METHOD
from pum.common.settings import PumSettings

__all__ = ["Coalition", "CoalitionGuarantee", "Guarantee", "PrivacyReport", "RoundRelease", "SeedFormula",
           "privacy_report", "EVERY_COPY", "EXPECTED_POLICY", "NO_CLIPPING", "NO_NOISE", "NO_PUBLIC_BASE",
           "RELATIVE_NOISE", "UNCLIPPED_GROUPS", "ZERO_SUM_SMALL_TAU"]

Number = float | Literal["inf"]

NO_PUBLIC_BASE = ("no sensitivity bound: the center is not clipped relative to a public model, "
                  "so no ε is meaningful")
NO_CLIPPING = ("no sensitivity bound: the center is not clipped (no center_clip_C_*, DP sensitivity or quantile "
               "policy), so nothing bounds how far another model would move it and no ε is computed")
UNCLIPPED_GROUPS = ("no sensitivity bound: {groups} published without center clipping (set center_clip_C_global "
                    "for the embeddings, final norm and lm_head), so no ε is computed")
RELATIVE_NOISE = ("relative noise: σ_ℓ = κ·RMS(θ_ℓ − θ_base,ℓ) is computed from the private model, so the noise "
                  "scale itself depends on the data and no ε follows; use dp_epsilon (or a manual σ with "
                  "center clipping and a public base) for a guarantee")
NO_NOISE = ("σ_ℓ = 0 for {groups}: those parameters are published without Gaussian noise, "
            "so no ε is meaningful (κ = 0 or σ = 0 is a control run, not a private one)")
ZERO_SUM_SMALL_TAU = ("a party holding all m copies of a round can recover the center far better than the seed "
                      "formula assumes: the jitter τ_ℓ is small against σ_ℓ (see true_release; dp_target="
                      "'true_release' calibrates τ_ℓ, or use independent noise)")
EXPECTED_POLICY = ("dp_alpha_policy 'expected' uses S_α = m/(α_min·α_max): the seed-formula ε is "
                   "an average, not a bound")
EVERY_COPY = "all worker tokens of the job belong to one data owner, who holds every copy of every round"
FORMULA_ASSUMES = "the m copies are independent Gaussian releases with stds α_k·σ_ℓ (jitter ignored)"


@dataclass(frozen=True)
class RoundRelease:
    """What one round publishes, as the accountant needs it."""

    alphas: Sequence[float]                         # α_k of the round (secret: never in the report)
    sigmas: Mapping[str, float]                     # σ_ℓ per layer group
    taus: Mapping[str, float]                       # τ_ℓ per layer group
    clip_norms: Mapping[str, float | None] | None   # C_ℓ of the round; None = the center is not clipped
    opened: bool = True                             # False: planned, not yet published


@dataclass(frozen=True)
class Coalition:
    """The most copies of one round that one party may hold, and why."""

    copies: int
    source: str
    observed: int | None = None   # the most distinct copies of one round one party has leased so far


@dataclass(frozen=True)
class Guarantee:
    """One (ε, δ) figure. ε and μ are "inf" when unbounded, None when not computed."""

    epsilon: Number | None
    unbounded: bool               # True: no finite ε holds (epsilon and mu are "inf")
    mu: Number | None             # μ = √(Σ μ²) of the Gaussian mechanism (sensitivity/σ)
    delta: float
    copies: int                   # copies per round the figure lets the party hold
    conversion: str               # exact | improved | classic
    assumes: str                  # what the figure takes for granted


@dataclass(frozen=True)
class SeedFormula(Guarantee):
    """The seed's formula: copies treated as independent releases."""

    order: float | None = None                    # best RDP order λ (None for exact, or not computed)
    alpha_policy: str = "worstcase"               # worstcase | expected | realized
    s_alpha: list[float] = field(default_factory=list)   # S_α of each round
    is_bound: bool = False                        # True only for independent noise with a worst-case/realized S_α


@dataclass(frozen=True)
class CoalitionGuarantee(Guarantee):
    """The true ε for the worst set of `copies` copies per round."""

    source: str = ""
    observed: int | None = None


@dataclass(frozen=True)
class PrivacyReport:
    """A job's privacy report (every field documented; `to_dict` is its JSON form)."""

    epsilon: Number | None        # headline: the true ε against the largest party, over every round
    unbounded: bool               # the headline ε is infinite
    delta: float
    headline: str                 # what the headline ε is
    meaningful: bool              # an ε was computed (see no_epsilon_reasons otherwise)
    rounds: int                   # rounds accounted: the job's rounds_R
    rounds_opened: int            # of which published so far (the rest as planned)
    copies_m: int
    noise_structure: str          # zero_sum | independent
    noise_mode: str               # dp | manual | manual_per_layer | relative
    dp_target: str | None         # true_release | seed_formula (dp mode), else None
    calibration: str | None       # how σ_ℓ and τ_ℓ were chosen (dp mode)
    seed_formula: SeedFormula
    true_release: Guarantee
    largest_coalition: CoalitionGuarantee
    sigmas: list[dict[str, float]]            # σ_ℓ per round
    taus: list[dict[str, float]]              # τ_ℓ per round
    sensitivities: list[dict[str, float | None]]  # Δ̄_ℓ = 2·C_ℓ per round (None: group not clipped)
    noise_total_variance: float | None        # Σ_ℓ d_ℓ·σ_ℓ² of round 1 (one copy's base noise before α)
    jitter_total_variance: float | None       # Σ_ℓ d_ℓ·τ_ℓ² of round 1
    no_epsilon_reasons: list[str]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: float) -> Number:
    return "inf" if math.isinf(value) else value


def _guarantee(cls, mu2: float | None, epsilon: float | None, **fields) -> Any:
    if mu2 is None:
        return cls(epsilon=None, unbounded=False, mu=None, **fields)
    return cls(epsilon=_number(epsilon), unbounded=math.isinf(epsilon), mu=_number(math.sqrt(mu2)), **fields)


def _no_epsilon_reasons(settings: PumSettings, rounds: Sequence[RoundRelease], has_public_base: bool) -> list[str]:
    reasons = []
    if settings.noise_mode == "relative":
        reasons.append(RELATIVE_NOISE)
    if any(r.clip_norms is None for r in rounds):
        reasons.append(NO_CLIPPING)
    unclipped = sorted({g for r in rounds if r.clip_norms is not None for g in r.sigmas if r.clip_norms.get(g) is None})
    if unclipped:
        reasons.append(UNCLIPPED_GROUPS.format(groups=", ".join(unclipped)))
    if not has_public_base:
        reasons.append(NO_PUBLIC_BASE)
    noiseless = sorted({g for r in rounds for g, s in r.sigmas.items() if s <= 0 and r.taus.get(g, 0.0) <= 0})
    if noiseless:
        reasons.append(NO_NOISE.format(groups=", ".join(noiseless)))
    return reasons


def _round_variance(sizes: Mapping[str, int] | None, scales: Mapping[str, float] | None) -> float | None:
    if not sizes or not scales or any(g not in scales for g in sizes):
        return None
    return sum(d * scales[g] ** 2 for g, d in sizes.items())


def _small_tau(settings: PumSettings, rnd: RoundRelease, s: float) -> bool:
    """Zero-sum: some group's 1ᵀΣ⁻¹1 is over twice the formula's S_α/σ_ℓ² (a party with all copies does better)."""
    for g, sigma in rnd.sigmas.items():
        if sigma <= 0:
            continue
        true = ones_precision(copy_covariance(rnd.alphas, sigma, rnd.taus[g], settings.noise_structure))
        if true > 2.0 * s / sigma**2:
            return True
    return False


def privacy_report(settings: PumSettings, rounds: Sequence[RoundRelease], coalition: Coalition,
                   group_sizes: Mapping[str, int] | None = None, has_public_base: bool = True) -> PrivacyReport:
    """The report of a job over `rounds` (opened and planned); `coalition` says what one party may hold."""
    m, delta, structure = settings.copies_m, settings.dp_delta, settings.noise_structure
    reasons = _no_epsilon_reasons(settings, rounds, has_public_base)
    meaningful = not reasons and bool(rounds)
    j = min(coalition.copies, m)
    warnings: list[str] = []
    s_alphas = [s_alpha(settings.dp_alpha_policy, m, settings.alpha_min, settings.alpha_max, r.alphas) for r in rounds]
    if structure == "zero_sum" and any(_small_tau(settings, r, s) for r, s in zip(rounds, s_alphas)):
        warnings.append(ZERO_SUM_SMALL_TAU)
    if settings.dp_alpha_policy == "expected":
        warnings.append(EXPECTED_POLICY)

    formula2 = true2 = coal2 = None
    if meaningful:
        formula2 = true2 = coal2 = 0.0
        for rnd, s in zip(rounds, s_alphas):
            sens = {g: 2.0 * float(c) for g, c in rnd.clip_norms.items() if g in rnd.sigmas}
            formula2 += s * sum(d * d / rnd.sigmas[g] ** 2 if rnd.sigmas[g] > 0 else math.inf
                                for g, d in sens.items() if d > 0)
            true2 += round_mu_squared(rnd.alphas, rnd.sigmas, sens, rnd.taus, structure)
            coal2 += worst_subset_mu_squared(rnd.alphas, rnd.sigmas, sens, rnd.taus, structure, j)
    f_eps, f_order = epsilon_for(math.sqrt(formula2), delta, settings.dp_conversion, settings.dp_rdp_orders) \
        if meaningful else (None, None)
    exact = lambda mu2: true_epsilon(math.sqrt(mu2), delta) if mu2 is not None else None  # noqa: E731
    seed = _guarantee(
        SeedFormula, formula2, f_eps, delta=delta, copies=m, conversion=settings.dp_conversion,
        assumes=FORMULA_ASSUMES, order=f_order, alpha_policy=settings.dp_alpha_policy, s_alpha=s_alphas,
        is_bound=structure == "independent" and settings.dp_alpha_policy != "expected",
    )
    release = _guarantee(Guarantee, true2, exact(true2), delta=delta, copies=m, conversion="exact",
                         assumes="one party holds all m copies of every round")
    largest = _guarantee(CoalitionGuarantee, coal2, exact(coal2), delta=delta, copies=j, conversion="exact",
                         assumes=f"one party holds the worst {j} of the m copies of every round",
                         source=coalition.source, observed=coalition.observed)
    dp = settings.noise_mode == "dp"
    first = rounds[0] if rounds else None
    return PrivacyReport(
        epsilon=largest.epsilon, unbounded=largest.unbounded, delta=delta,
        headline=f"true ε of the release against the largest party ({j} of {m} copies of each of "
                 f"{len(rounds)} rounds), exact conversion",
        meaningful=meaningful, rounds=len(rounds), rounds_opened=sum(r.opened for r in rounds), copies_m=m,
        noise_structure=structure, noise_mode=settings.noise_mode, dp_target=settings.dp_target if dp else None,
        calibration=(TRUE_RELEASE_METHOD if settings.dp_target == "true_release" else SEED_FORMULA_METHOD)
        if dp else None, seed_formula=seed, true_release=release, largest_coalition=largest,
        sigmas=[dict(r.sigmas) for r in rounds], taus=[dict(r.taus) for r in rounds],
        sensitivities=[{g: (2.0 * c if c is not None else None) for g, c in (r.clip_norms or {}).items()}
                       for r in rounds],
        noise_total_variance=_round_variance(group_sizes, first.sigmas if first else None),
        jitter_total_variance=_round_variance(group_sizes, first.taus if first else None),
        no_epsilon_reasons=reasons, warnings=warnings,
    )
