"""NPO: Negative Preference Optimization.

Zhang, Lin, Bai, Mei 2024, "Negative Preference Optimization: From Catastrophic Collapse to
Effective Unlearning" (arXiv:2404.05868). At sequence level, with log π = −NLL summed over the
answer tokens:

    L_f = (2/β)·mean_i log(1 + (π_θ(y_i|x_i) / π_ref(y_i|x_i))^β)
        = (2/β)·mean_i softplus(β·(log π_θ(y_i|x_i) − log π_ref(y_i|x_i)))

and L = γ·L_f + α·L_ret (L_ret = CE(B_r), or KL to the reference on B_r). With π_θ = π_ref,
L_f = (2/β)·log 2; as β → 0, L_f → 2 + mean log π_θ/π_ref (gradient ascent's direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pum.common.qa import sequence_nll

from .base import (
    SEQUENCES, Batch, RetainWeighted, check_retain_loss, forward_logits, mean_of, reference_logits,
)
from .registry import register


def npo_forget_loss(
    log_p_theta: torch.Tensor, log_p_ref: torch.Tensor, beta: float, count: torch.Tensor | None = None
) -> torch.Tensor:
    """(2/β)·mean softplus(β·(log π_θ − log π_ref)) over sequences (the log-probs are [batch]; or the step's `count`)."""
    return (2.0 / beta) * mean_of(F.softplus(beta * (log_p_theta - log_p_ref)), count)


@register
class NPO(RetainWeighted):
    name = "NPO"
    needs_reference = True

    @dataclass(frozen=True)
    class Params:
        beta: float = 0.1  # β, inverse temperature of the preference loss (> 0)
        gamma: float = 1.0  # γ, weight of the forget (NPO) term
        alpha: float = 1.0  # α, weight of the retain term; 0 drops it (and the need for a retain set)
        retain_loss: str = "nll"  # retain term: "nll" = CE(B_r), "kl" = KL(reference ‖ model) on B_r

        def __post_init__(self):
            if not self.beta > 0:
                raise ValueError(f"NPO beta must be > 0 (got {self.beta}): the loss divides by it")
            check_retain_loss(self.retain_loss)

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Params) -> torch.Tensor:
        labels = forget_batch["labels"]
        nll_theta, _ = sequence_nll(forward_logits(model, forget_batch), labels)
        nll_ref, _ = sequence_nll(reference_logits(reference, forget_batch), labels)
        forget_term = npo_forget_loss(-nll_theta, -nll_ref, params.beta, forget_batch.get(SEQUENCES))
        return self.with_retain(forget_term, model, reference, retain_batch, params)
