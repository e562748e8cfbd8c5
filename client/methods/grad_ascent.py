"""GradAscent: gradient ascent on the forget set.

Minimises L = −CE(B_f), i.e. raises the answer NLL of the forget set (Jang et al. 2023,
"Knowledge Unlearning for Mitigating Privacy Risks in Language Models"; the TOFU baseline,
Maini et al. 2024). No retain term, no reference model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ANSWER_TOKENS, Batch, UnlearningMethod, answer_ce, forward_logits
from .registry import register


def gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """L = −CE: minus the mean next-token NLL over the batch's answer tokens (or the step's `count`)."""
    return -answer_ce(logits, labels, count)


@register
class GradAscent(UnlearningMethod):
    name = "GradAscent"
    needs_reference = False
    needs_retain = False

    @dataclass(frozen=True)
    class Params:
        pass  # no hyperparameters beyond the optimiser's

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Params) -> torch.Tensor:
        return gradient_ascent_loss(
            forward_logits(model, forget_batch), forget_batch["labels"], forget_batch.get(ANSWER_TOKENS)
        )
