"""SimNPO: Simple Negative Preference Optimization, NPO without a reference model.

Fan, Liu, Lin, Jia, Zhang, Mei, Liu 2024, "Simplicity Prevails: Rethinking Negative Preference
Optimization for LLM Unlearning" (arXiv:2410.07163, NeurIPS 2025). The paper's forget loss is

    L_f = mean_i −(2/β)·log σ(−(β/|y_i|)·log π_θ(y_i|x_i) − δ)

with |y| the number of answer tokens and δ ≥ 0 the reward margin (the paper calls it γ; here γ
is the forget-term weight, as everywhere in DESIGN.md §6). Since log π = −NLL,
−(β/|y|)·log π_θ = β·NLL/|y|, so

    L_f = mean_i −(2/β)·log σ(β·NLL_i/|y_i| − δ) = (2/β)·mean_i softplus(δ − β·NLL_i/|y_i|),

which decreases as the per-token NLL grows: minimising it pushes the forget answers' NLL up, with
a gradient weight σ(δ − β·NLL/|y|) that fades once an answer is unlikely (the NPO-style brake).

Reconciliation with DESIGN.md §6, which writes −(2/β)·mean log σ(β·(NLL/|y| − δ)): the sign
agrees with the paper (β·NLL/|y| inside the sigmoid, not −β·NLL/|y|); the margin differs only in
scale. DESIGN's form (also the authors' code and open-unlearning's `SimNPO`) multiplies δ by β;
the paper's equation does not. We implement the paper's equation, so DESIGN's margin d is
`delta = β·d`; at the default δ = 0 the two are the same loss.

L = γ·L_f + α·L_ret (L_ret = CE(B_r), or KL to the reference on B_r). Defaults are
open-unlearning's TOFU settings: β = 4.5, δ = 0, γ = 0.125, α = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pum.common.qa import sequence_nll

from .base import SEQUENCES, Batch, RetainWeighted, check_positive, check_retain_loss, forward_logits, mean_of
from .registry import register


def simnpo_forget_loss(
    nll: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float = 0.0, count: torch.Tensor | None = None
) -> torch.Tensor:
    """(2/β)·mean softplus(δ − β·NLL/|y|) = −(2/β)·mean log σ(β·NLL/|y| − δ), over sequences.

    `nll` [batch] sums each answer's token NLLs; `lengths` [batch] counts its answer tokens
    (a sequence without answer tokens counts as length 1, so it adds (2/β)·softplus(δ)); `count`:
    the step's number of sequences (microbatches).
    """
    per_token = nll / lengths.clamp(min=1).to(nll.dtype)
    return (2.0 / beta) * mean_of(F.softplus(delta - beta * per_token), count)


@register
class SimNPO(RetainWeighted):
    name = "SimNPO"
    needs_reference = False  # only with retain_loss="kl"

    @dataclass(frozen=True)
    class Params:
        beta: float = 4.5  # β, inverse temperature of the length-normalised preference loss (> 0)
        delta: float = 0.0  # δ, reward margin as in the paper's equation (DESIGN's margin × β)
        gamma: float = 0.125  # γ, weight of the forget (SimNPO) term
        alpha: float = 1.0  # α, weight of the retain term; 0 drops it (and the need for a retain set)
        retain_loss: str = "nll"  # retain term: "nll" = CE(B_r), "kl" = KL(reference ‖ model) on B_r

        def __post_init__(self):
            check_positive("SimNPO", "beta", self.beta, "the loss divides by it")
            check_retain_loss(self.retain_loss)

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Params) -> torch.Tensor:
        nll, lengths = sequence_nll(forward_logits(model, forget_batch), forget_batch["labels"])
        forget_term = simnpo_forget_loss(nll, lengths, params.beta, params.delta, forget_batch.get(SEQUENCES))
        return self.with_retain(forget_term, model, reference, retain_batch, params)
