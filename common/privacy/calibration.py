"""Calibrate the per-layer noise scales σ_ℓ to a target (ε, δ) (DESIGN.md §5).

Treating the m copies of a round as independent Gaussian releases with stds α_k·σ_ℓ, one round
is a single Gaussian mechanism with

    μ_round² = S_α · Σ_ℓ Δ̄_ℓ²/σ_ℓ²,   Δ̄_ℓ = 2·C_ℓ,   S_α = Σ_k 1/α_k²,

and R rounds compose to μ² = Σ_r μ_r². The target μ* is the largest μ meeting (ε, δ) under the
chosen conversion, each round gets μ_round² = μ*²/R, and the per-round budget is

    B = μ_round² / S_α   (so that Σ_ℓ Δ̄_ℓ²/σ_ℓ² = B).

Allocations of B over the L layer groups (all meet the constraint exactly):

    equalized  σ_ℓ = Δ̄_ℓ·√(L/B)                         (each group spends B/L)
    varmin     σ_ℓ² = (Σ_j Δ̄_j·√d_j)·Δ̄_ℓ / (B·√d_ℓ)   (minimises the total variance Σ_ℓ d_ℓ·σ_ℓ²)
    single     σ = Δ_tot/√B, Δ_tot = dp_sensitivity_total_l2 when set, else √(Σ_ℓ Δ̄_ℓ²)

`auto` computes equalized and varmin and keeps the smaller Σ d_ℓσ_ℓ². Every σ_ℓ scales as
1/√B, so the comparison is the same at every RDP order, and the best order (largest μ*) gives
the least noise for either allocation: searching per order and keeping the best is this.
Since varmin is the constrained minimiser, `auto` picks it (equalized only on a tie).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pum.common.errors import InvalidInput
from pum.common.privacy.exact import epsilon_exact, max_mu_exact
from pum.common.privacy.rdp import epsilon as rdp_epsilon
from pum.common.privacy.rdp import max_mu as rdp_max_mu
from pum.common.settings import PumSettings

log = logging.getLogger(__name__)

__all__ = ["Calibration", "calibrate", "s_alpha", "max_mu_for", "epsilon_for", "layer_sensitivities",
           "equalized_sigmas", "varmin_sigmas", "single_sigma", "total_variance"]


def s_alpha(policy: str, m: int, alpha_min: float, alpha_max: float, alphas: Sequence[float] | None = None) -> float:
    """S_α of one round: worstcase m/α_min² (a bound), expected m/(α_min·α_max) (an average over
    α ~ U[α_min, α_max], not a bound), realized Σ_k 1/α_k² of the drawn α (a bound)."""
    if policy == "worstcase":
        return m / alpha_min**2
    if policy == "expected":
        return m / (alpha_min * alpha_max)
    if policy == "realized":
        if not alphas:
            raise InvalidInput("dp_alpha_policy='realized' needs the round's drawn α: draw them before calibrating")
        if len(alphas) != m or min(alphas) <= 0:
            raise InvalidInput(f"realized α must be {m} positive values (got {list(alphas)!r})")
        return sum(1.0 / a**2 for a in alphas)
    raise ValueError(f"unknown S_α policy {policy!r}: use one of ['expected', 'realized', 'worstcase']")


def max_mu_for(eps: float, delta: float, conversion: str, orders: Sequence[float]) -> tuple[float, float | None]:
    """(μ*, best order) for any conversion; the order is None for `exact`."""
    if conversion == "exact":
        return max_mu_exact(eps, delta), None
    return rdp_max_mu(eps, delta, orders, conversion)


def epsilon_for(mu: float, delta: float, conversion: str, orders: Sequence[float]) -> tuple[float, float | None]:
    """(ε, best order) of a Gaussian mechanism with μ for any conversion; the order is None for `exact`."""
    if conversion == "exact":
        return epsilon_exact(mu, delta), None
    return rdp_epsilon(mu, delta, orders, conversion)


def equalized_sigmas(sens: Mapping[str, float], budget: float) -> dict[str, float]:
    """σ_ℓ = Δ̄_ℓ·√(L/B)."""
    scale = math.sqrt(len(sens) / budget)
    return {g: d * scale for g, d in sens.items()}


def varmin_sigmas(sens: Mapping[str, float], sizes: Mapping[str, int], budget: float) -> dict[str, float]:
    """σ_ℓ² = (Σ_j Δ̄_j·√d_j)·Δ̄_ℓ/(B·√d_ℓ): the minimiser of Σ d_ℓσ_ℓ² under Σ Δ̄_ℓ²/σ_ℓ² = B."""
    k = sum(d * math.sqrt(sizes[g]) for g, d in sens.items())
    return {g: math.sqrt(k * d / (budget * math.sqrt(sizes[g]))) for g, d in sens.items()}


def single_sigma(total_sensitivity: float, budget: float) -> float:
    """σ = Δ_tot/√B."""
    return total_sensitivity / math.sqrt(budget)


def total_variance(sigmas: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    """Σ_ℓ d_ℓ·σ_ℓ² over the groups of `sizes`: the expected squared norm of one copy's base noise (before α)."""
    return sum(d * sigmas[g] ** 2 for g, d in sizes.items())


def layer_sensitivities(settings: PumSettings, groups: Sequence[str],
                        clip_norms: Mapping[str, float | None] | None) -> dict[str, float] | None:
    """Δ̄_ℓ per group: 2·C_ℓ from the center clipping norms, else `dp_sensitivity_per_layer_l2`
    (one value for all groups, or one per group in `groups` order). None when unknown or partial
    (a group without C_ℓ, e.g. no center_clip_C_global, is published unclipped: nothing bounds it)."""
    if clip_norms is not None:
        if not groups or any(clip_norms.get(g) is None for g in groups):
            return None
        return {g: 2.0 * float(clip_norms[g]) for g in groups}
    given = settings.dp_sensitivity_per_layer_l2
    if given is None or not groups:
        return None
    if len(given) == 1:
        return {g: float(given[0]) for g in groups}
    return {g: float(v) for g, v in zip(groups, given)} if len(given) == len(groups) else None


@dataclass(frozen=True)
class Calibration:
    """The noise scales for one round and how they were obtained."""

    sigmas: dict[str, float]           # σ_ℓ per layer group
    default_sigma: float | None        # σ for a group not in `sigmas` (single-σ mode), else None
    mu_target: float                   # μ* over all R rounds for (ε, δ) under `conversion`
    mu_round: float                    # μ* / √R, the per-round share
    s_alpha: float                     # S_α of the policy
    budget: float                      # B = μ_round² / S_α = Σ_ℓ Δ̄_ℓ²/σ_ℓ²
    policy: str                        # worstcase | expected (an average, not a bound) | realized
    conversion: str                    # improved | classic | exact
    order: float | None                # best RDP order λ (None for exact)
    allocation: str                    # equalized | varmin | single | manual
    sensitivities: dict[str, float]    # Δ̄_ℓ used (empty when unknown)
    total_variance: float | None       # Σ_ℓ d_ℓσ_ℓ² (None when the sizes are unknown)
    warnings: tuple[str, ...] = field(default_factory=tuple)
    fallback: bool = False             # True: calibration was infeasible, `sigmas` are the manual ones

    def sigma_for(self, group: str) -> float:
        """σ of a layer group (the single σ for any group in single-σ mode)."""
        if group in self.sigmas:
            return self.sigmas[group]
        if self.default_sigma is None:
            raise KeyError(f"no σ calibrated for layer group {group!r}")
        return self.default_sigma


def calibrate(settings: PumSettings, group_sizes: Mapping[str, int] | None = None,
              clip_norms: Mapping[str, float] | None = None, alphas: Sequence[float] | None = None,
              manual_sigmas: Mapping[str, float] | None = None) -> Calibration:
    """σ_ℓ for one round meeting `settings.dp_epsilon`/`dp_delta` over `rounds_R` rounds.

    `group_sizes` d_ℓ and `clip_norms` C_ℓ are keyed by layer group (`pum.common.layers`);
    `alphas` are the round's α (needed by the `realized` policy). Fallbacks, each logged as a
    warning: per-layer noise without sizes (varmin/auto) or per-layer sensitivities → one σ for the
    model; no sensitivity at all → `manual_sigmas` returned with `fallback=True` (InvalidInput
    when none are given).
    """
    if settings.dp_epsilon is None:
        raise InvalidInput("calibrate needs dp_epsilon: set a target ε (or use a manual or relative σ)")
    m, rounds, delta = settings.copies_m, settings.rounds_R, settings.dp_delta
    s = s_alpha(settings.dp_alpha_policy, m, settings.alpha_min, settings.alpha_max, alphas)
    mu_t, order = max_mu_for(settings.dp_epsilon, delta, settings.dp_conversion, settings.dp_rdp_orders)
    mu_round = mu_t / math.sqrt(rounds)
    budget = mu_round**2 / s
    groups = list(group_sizes or clip_norms or {})
    sens = layer_sensitivities(settings, groups, clip_norms)
    warnings: list[str] = []
    common = dict(mu_target=mu_t, mu_round=mu_round, s_alpha=s, budget=budget, policy=settings.dp_alpha_policy,
                  conversion=settings.dp_conversion, order=order)

    def warn(text: str) -> None:
        log.warning(text)
        warnings.append(text)

    if order is not None and 0 < mu_t < math.inf and rdp_epsilon(mu_t, delta, settings.dp_rdp_orders,
                                                                  settings.dp_conversion)[0] == 0.0:
        warn(f"dp_epsilon = {settings.dp_epsilon} is below what the RDP orders can certify: only the "
             f"total-variation bound is left (μ* = {mu_t:.3g}, a huge σ); add larger dp_rdp_orders or use "
             "dp_conversion='exact'")
    if settings.dp_alpha_policy == "expected":
        warn("dp_alpha_policy='expected' uses S_α = m/(α_min·α_max), an average over α, not a bound")
    allocation = settings.dp_per_layer_allocation
    if settings.per_layer_noise and sens is not None and budget > 0:
        if group_sizes is None and allocation != "equalized":
            warn(f"per-layer allocation {allocation!r} needs the layer sizes d_ℓ, which are unknown: "
                 "using one σ for the model")
        else:
            names = ("equalized", "varmin") if allocation == "auto" else (allocation,)
            options = {n: equalized_sigmas(sens, budget) if n == "equalized" else
                       varmin_sigmas(sens, group_sizes, budget) for n in names}
            name = min(options, key=lambda k: total_variance(options[k], group_sizes) if group_sizes else 0.0)
            sig = options[name]
            tv = total_variance(sig, group_sizes) if group_sizes else None
            return Calibration(sigmas=sig, default_sigma=None, allocation=name, sensitivities=sens,
                               total_variance=tv, warnings=tuple(warnings), **common)
    elif settings.per_layer_noise and budget > 0:
        warn("per-layer noise requested but the per-layer sensitivities are unknown (no C_ℓ for every group "
             "and no dp_sensitivity_per_layer_l2 of matching length): using one σ for the model")
    total = settings.dp_sensitivity_total_l2
    if total is None and sens is not None:
        total = math.sqrt(sum(d * d for d in sens.values()))
    if total is not None and budget > 0:
        sigma = single_sigma(total, budget)
        tv = sigma**2 * sum(group_sizes.values()) if group_sizes else None
        return Calibration(sigmas={g: sigma for g in groups}, default_sigma=sigma, allocation="single",
                           sensitivities=sens or {}, total_variance=tv, warnings=tuple(warnings), **common)
    text = ("no feasible DP calibration: no sensitivity is known (give center clipping norms C_ℓ, "
            "dp_sensitivity_per_layer_l2 or dp_sensitivity_total_l2)" if total is None else
            f"no feasible DP calibration: μ* = {mu_t!r} for ε = {settings.dp_epsilon}")
    if manual_sigmas is None:
        raise InvalidInput(text + ", and no manual σ to fall back on")
    warn(text + ": keeping the manual σ, with no DP guarantee")
    tv = total_variance(manual_sigmas, group_sizes) if group_sizes and set(manual_sigmas) >= set(group_sizes) else None
    return Calibration(sigmas=dict(manual_sigmas), default_sigma=None, allocation="manual",
                       sensitivities=sens or {}, total_variance=tv, warnings=tuple(warnings), fallback=True, **common)
