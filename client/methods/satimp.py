"""SatImp: token-weighted ascent by saturation and importance.

Yang, Wang, Huang, Liu, Zhang, Han 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM
Unlearning" (ICML 2025, arXiv:2505.11953). Saturation favours tokens that are still likely
(weight p^β1, as WGA); importance favours tokens whose likelihood still has room to fall
(weight (1 − p)^β2). SatImp multiplies the two, detached:

    L_f = −mean_t w_t·NLL_t,   w_t = p_t^β1·(1 − p_t)^β2,   p_t = p_θ(y_t | x, y_<t)

over the batch's answer tokens. Source of the formula: the paper's SatImp and its code
(tmlr-group/SatImp, `satimp` loss: weights exp(−ℓ)^β1·(1 − exp(−ℓ))^β2 on the token losses),
mirrored in open-unlearning's `SatImp`. Defaults β1 = 5, β2 = 1, γ = 0.1, α = 1 (retain CE) are
open-unlearning's SatImp config (the paper tunes them per benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pum.common.qa import token_nll

from .base import ANSWER_TOKENS, Batch, RetainWeighted, check_retain_loss, forward_logits, weighted_ascent_loss
from .registry import register


def satimp_weights(nll: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """w_t = p_t^β1·(1 − p_t)^β2 with p_t = exp(−NLL_t), detached."""
    p = torch.exp(-nll.detach())
    return p**beta1 * (1 - p) ** beta2


def satimp_loss(
    logits: torch.Tensor, labels: torch.Tensor, beta1: float, beta2: float, count: torch.Tensor | None = None
) -> torch.Tensor:
    """−mean over answer tokens (or the step's `count`) of p_t^β1·(1 − p_t)^β2·NLL_t, weights detached."""
    nll = token_nll(logits, labels)
    return weighted_ascent_loss(nll, labels, satimp_weights(nll, beta1, beta2), count)


@register
class SatImp(RetainWeighted):
    name = "SatImp"
    needs_reference = False  # only with retain_loss="kl"

    @dataclass(frozen=True)
    class Params:
        beta1: float = 5.0  # β1, saturation exponent: weight p^β1 (≥ 0)
        beta2: float = 1.0  # β2, importance exponent: weight (1 − p)^β2 (≥ 0)
        gamma: float = 0.1  # γ, weight of the forget (weighted ascent) term
        alpha: float = 1.0  # α, weight of the retain term; 0 drops it (and the need for a retain set)
        retain_loss: str = "nll"  # retain term: "nll" = CE(B_r), "kl" = KL(reference ‖ model) on B_r

        def __post_init__(self):
            for name in ("beta1", "beta2"):
                if not getattr(self, name) >= 0:
                    raise ValueError(f"SatImp {name} must be ≥ 0 (got {getattr(self, name)})")
            check_retain_loss(self.retain_loss)

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Params) -> torch.Tensor:
        logits = forward_logits(model, forget_batch)
        forget_term = satimp_loss(logits, forget_batch["labels"], params.beta1, params.beta2,
                                  forget_batch.get(ANSWER_TOKENS))
        return self.with_retain(forget_term, model, reference, retain_batch, params)
