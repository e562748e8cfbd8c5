"""GradDiff: ascent on the forget set, descent on the retain set.

L = γ·(−CE(B_f)) + α·L_ret, with L_ret = CE(B_r) (`retain_loss="nll"`) or
KL(reference ‖ model) on B_r's answer tokens (`retain_loss="kl"`). Liu et al. 2022,
"Continual Learning and Private Unlearning"; the TOFU "Grad. Diff." baseline (Maini et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ANSWER_TOKENS, Batch, RetainWeighted, answer_ce, check_retain_loss, forward_logits
from .registry import register


@register
class GradDiff(RetainWeighted):
    name = "GradDiff"
    needs_reference = False  # only with retain_loss="kl" (RetainWeighted.uses_reference)

    @dataclass(frozen=True)
    class Params:
        gamma: float = 1.0  # γ, weight of the forget (ascent) term
        alpha: float = 1.0  # α, weight of the retain term; 0 drops it (and the need for a retain set)
        retain_loss: str = "nll"  # retain term: "nll" = CE(B_r), "kl" = KL(reference ‖ model) on B_r

        def __post_init__(self):
            check_retain_loss(self.retain_loss)

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Params) -> torch.Tensor:
        forget_ce = answer_ce(forward_logits(model, forget_batch), forget_batch["labels"], forget_batch.get(ANSWER_TOKENS))
        return self.with_retain(-forget_ce, model, reference, retain_batch, params)
