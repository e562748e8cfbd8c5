"""CE-U: Cross Entropy Unlearning.

Yang 2025, "CE-U: Cross Entropy Unlearning" (arXiv:2503.01224). At each answer position t the
target is the model's own next-token distribution with the answer token removed:

    q_t = softmax(z̃_t),   z̃_t = stopgrad(z_θ,t) with z̃_t[y_t] = −∞
    L_f = mean_t −Σ_v q_t(v)·log p_θ(v | x, y_<t)

over the batch's answer tokens. The gradient with respect to the logits is p_θ − q_t: y_t's logit
goes down by p_θ(y_t) and the others up in proportion to their own probabilities. It is bounded
(unlike ascent's 1/p factor) and vanishes as p_θ(y_t) → 0. No reference model.

The paper trains on the forget set alone, so the retain weight α defaults to 0 (γ·L_f + α·L_ret
when set). open-unlearning's CEU also skips the first answer token (a footnote of the paper);
this implementation scores every answer token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ANSWER_TOKENS, Batch, RetainWeighted, answer_logits, check_retain_loss, forward_logits
from .registry import register


def ceu_loss(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """mean over answer tokens (or the step's `count`) of CE(softmax(detached z with z[y] = −∞), softmax(z));
    logits [batch, seq, vocab]."""
    z, targets = answer_logits(logits, labels)
    masked = z.detach().scatter(-1, targets.unsqueeze(-1), float("-inf"))
    q = F.softmax(masked, dim=-1)
    per_token = -(q * F.log_softmax(z, dim=-1)).sum(dim=-1)
    return per_token.sum() / (max(1, per_token.numel()) if count is None else count)


@register
class CEU(RetainWeighted):
    name = "CE-U"
    aliases = ("CEU",)
    needs_reference = False  # only with retain_loss="kl"
    needs_retain = False  # only when alpha ≠ 0 (it is 0 by default)

    @dataclass(frozen=True)
    class Params:
        gamma: float = 1.0  # γ, weight of the forget (CE-U) term
        alpha: float = 0.0  # α, weight of the retain term; 0 (default, as in the paper) drops it
        retain_loss: str = "nll"  # retain term: "nll" = CE(B_r), "kl" = KL(reference ‖ model) on B_r

        def __post_init__(self):
            check_retain_loss(self.retain_loss)

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Params) -> torch.Tensor:
        forget_term = ceu_loss(forward_logits(model, forget_batch), forget_batch["labels"], forget_batch.get(ANSWER_TOKENS))
        return self.with_retain(forget_term, model, reference, retain_batch, params)
