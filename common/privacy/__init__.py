"""Privacy accounting: DP calibration of the noise and the guarantee of what is released (DESIGN.md §5).

    rdp          Gaussian RDP ε(λ) = λμ²/2 and its (ε, δ) conversions (improved, classic)
    exact        the analytic Gaussian δ(ε; μ) (Balle & Wang 2018), tight for this mechanism
    calibration  S_α policies, the per-round budget and the σ_ℓ allocations → `calibrate`
    release      the true μ of the released copies (zero-sum or independent, jitter τ_ℓ, coalitions)
    target       `calibrate_round`: σ_ℓ and τ_ℓ of a round for dp_target (true_release | seed_formula)
    report       `privacy_report`: headline true ε, seed formula, true release, largest coalition
    audit        attacks on a round's copies (min-variance, center-free), to check the accounting

μ is sensitivity/σ throughout (the inverse of the usual noise multiplier); R rounds add μ².
Runtime code needs numpy and scipy only.
"""

from pum.common.privacy.audit import audit, estimate_center, min_variance_weights
from pum.common.privacy.calibration import (
    Calibration, calibrate, epsilon_for, equalized_sigmas, layer_sensitivities, max_mu_for, s_alpha, single_sigma,
    total_variance, varmin_sigmas,
)
from pum.common.privacy.exact import delta_exact, epsilon_exact, log_delta_exact, max_mu_exact
from pum.common.privacy.rdp import epsilon, max_mu, rdp_gaussian, rdp_to_epsilon
from pum.common.privacy.release import copy_covariance, ones_precision, smallest_tau, true_epsilon, true_mu
from pum.common.privacy.report import Coalition, PrivacyReport, RoundRelease, privacy_report
from pum.common.privacy.target import RoundNoise, calibrate_round

__all__ = [
    "Calibration", "Coalition", "PrivacyReport", "RoundNoise", "RoundRelease", "audit", "calibrate",
    "calibrate_round", "copy_covariance", "delta_exact", "epsilon", "epsilon_exact", "epsilon_for",
    "equalized_sigmas", "estimate_center", "layer_sensitivities", "log_delta_exact", "max_mu", "max_mu_exact",
    "max_mu_for", "min_variance_weights", "ones_precision", "privacy_report", "rdp_gaussian", "rdp_to_epsilon",
    "s_alpha", "single_sigma", "smallest_tau", "total_variance", "true_epsilon", "true_mu", "varmin_sigmas",
]
