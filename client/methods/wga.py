"""WGA: Weighted Gradient Ascent, ascent with each token weighted by its own probability.

Wang, Zhou, Zhou, Shin, Han, Weinberger 2025, "Rethinking LLM Unlearning Objectives: A Gradient
Perspective and Go Beyond" (ICLR 2025, arXiv:2502.19301). Gradient ascent's per-token gradient
carries an inverse-confidence factor 1/p_θ(y_t) that blows up once a token is unlikely; WGA
cancels it with the detached weight w_t = p_θ(y_t | x, y_<t)^β:

    L_f = −mean_t w_t·NLL_t,   w_t = exp(−NLL_t)^β (no gradient through w_t)

over the batch's answer tokens, so tokens the model has already forgotten stop being pushed.
β = 0 is plain gradient ascent. The formula follows the paper's definition (weight p^β on the
log-likelihood) as implemented in open-unlearning's `WGA` (mean over answer tokens); the paper
calls the exponent α. L = γ·L_f + α·L_ret with defaults β = 1, γ = 1, α = 1 (retain CE), as in
open-unlearning's WGA config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pum.common.qa import token_nll

from .base import ANSWER_TOKENS, Batch, RetainWeighted, check_retain_loss, forward_logits, weighted_ascent_loss
from .registry import register


def wga_weights(nll: torch.Tensor, beta: float) -> torch.Tensor:
    """w_t = p_t^β = exp(−β·NLL_t), detached."""
    return torch.exp(-beta * nll.detach())


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, count: torch.Tensor | None = None) -> torch.Tensor:
    """−mean over answer tokens (or the step's `count`) of p_t^β·NLL_t, with p_t^β detached."""
    nll = token_nll(logits, labels)
    return weighted_ascent_loss(nll, labels, wga_weights(nll, beta), count)


@register
class WGA(RetainWeighted):
    name = "WGA"
    needs_reference = False  # only with retain_loss="kl"

    @dataclass(frozen=True)
    class Params:
        beta: float = 1.0  # β, exponent of the token weight p_θ(y_t)^β (≥ 0; 0 = gradient ascent)
        gamma: float = 1.0  # γ, weight of the forget (weighted ascent) term
        alpha: float = 1.0  # α, weight of the retain term; 0 drops it (and the need for a retain set)
        retain_loss: str = "nll"  # retain term: "nll" = CE(B_r), "kl" = KL(reference ‖ model) on B_r

        def __post_init__(self):
            if not self.beta >= 0:
                raise ValueError(f"WGA beta must be ≥ 0 (got {self.beta}): the weight p^β must not grow as p falls")
            check_retain_loss(self.retain_loss)

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Params) -> torch.Tensor:
        forget_term = wga_loss(forward_logits(model, forget_batch), forget_batch["labels"], params.beta,
                               forget_batch.get(ANSWER_TOKENS))
        return self.with_retain(forget_term, model, reference, retain_batch, params)
