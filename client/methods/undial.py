"""UNDIAL: self-distillation towards the reference's logits with the answer token pushed down.

Dong, Lin, Belkin, Huerta, Vulić 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust
Unlearning in Large Language Models" (arXiv:2402.10052). At each answer position t, with z_ref
the frozen reference's next-token logits and y_t the answer token, the target distribution is

    q_t = softmax(z_ref,t − β·onehot(y_t))

and the forget term is the cross-entropy of the model to it, averaged over the batch's answer
tokens: L_f = mean_t −Σ_v q_t(v)·log p_θ(v | x, y_<t). Only y_t's logit moves (down by β), so
the rest of the reference's distribution is kept: the model learns to rank y_t lower without
gradient ascent's unbounded push. L = γ·L_f + α·L_ret; defaults β = 10, α = 0 (no retain term),
as in open-unlearning's UNDIAL config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ANSWER_TOKENS, Batch, RetainWeighted, answer_logits, check_retain_loss, forward_logits, reference_logits
from .registry import register


def undial_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float, count: torch.Tensor | None = None
) -> torch.Tensor:
    """mean over answer tokens (or the step's `count`) of CE(softmax(z_ref − β·onehot(y)), softmax(z_θ));
    logits [batch, seq, vocab]."""
    z, targets = answer_logits(logits, labels)
    z_ref, _ = answer_logits(ref_logits.detach(), labels)
    adjusted = z_ref - beta * F.one_hot(targets, z_ref.size(-1)).to(z_ref.dtype)
    q = F.softmax(adjusted, dim=-1)
    per_token = -(q * F.log_softmax(z, dim=-1)).sum(dim=-1)
    return per_token.sum() / (max(1, per_token.numel()) if count is None else count)


@register
class UNDIAL(RetainWeighted):
    name = "UNDIAL"
    needs_reference = True
    needs_retain = False  # only when alpha ≠ 0 (it is 0 by default)

    @dataclass(frozen=True)
    class Params:
        beta: float = 10.0  # β, how far the answer token's reference logit is pushed down (≥ 0)
        gamma: float = 1.0  # γ, weight of the forget (distillation) term
        alpha: float = 0.0  # α, weight of the retain term; 0 (default) drops it and the need for a retain set
        retain_loss: str = "nll"  # retain term: "nll" = CE(B_r), "kl" = KL(reference ‖ model) on B_r

        def __post_init__(self):
            if not self.beta >= 0:
                raise ValueError(f"UNDIAL beta must be ≥ 0 (got {self.beta}): it lowers the answer token's logit")
            check_retain_loss(self.retain_loss)

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Params) -> torch.Tensor:
        labels = forget_batch["labels"]
        forget_term = undial_loss(
            forward_logits(model, forget_batch), reference_logits(reference, forget_batch), labels, params.beta,
            forget_batch.get(ANSWER_TOKENS),
        )
        return self.with_retain(forget_term, model, reference, retain_batch, params)
