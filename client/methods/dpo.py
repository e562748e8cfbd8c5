"""DPO (IdkDPO): prefer an "I don't know" answer over the forget answer.

Rafailov, Sharma, Mitchell, Ermon, Manning, Finn 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model" (arXiv:2305.18290); used for unlearning in TOFU
(Maini, Feng, Schwarzschild, Lipton, Kolter 2024, arXiv:2401.06121) with the forget answer y_f as
the rejected response and a refusal y_idk (one of `idontknow.txt`) as the preferred one:

    L_f = −(2/β)·mean_i log σ(β·[(log π_θ − log π_ref)(y_idk,i|x_i) − (log π_θ − log π_ref)(y_f,i|x_i)])

with sequence log-probabilities (log π = −NLL summed over answer tokens) and π_ref the frozen
reference. The 2/β scale follows DESIGN.md §6 and the SimNPO and open-unlearning code (TOFU's
original multiplies by 1); it only rescales the gradient. L = γ·L_f + α·L_ret, with β = 0.1 and
α = 1 (retain CE) by default.

The trainer builds forget batches through `DPO.collate_forget`, which pairs each forget question
with an idk answer drawn by the trainer's seeded generator (so a batch's choice is reproducible)
and stores that batch under `idk_input_ids`, `idk_attention_mask`, `idk_labels` (and the chosen
line numbers under `idk_index`) next to the forget batch's own keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pum.common.qa import QAPair, collate, sequence_nll

from .base import (
    SEQUENCES, Batch, RetainWeighted, check_positive, check_retain_loss, forward_logits, mean_of, reference_logits,
)
from .idk import check_idk_answers, choose_idk, load_idk_answers
from .registry import register

IDK_PREFIX = "idk_"


def dpo_forget_loss(
    log_p_idk: torch.Tensor,
    log_p_ref_idk: torch.Tensor,
    log_p_forget: torch.Tensor,
    log_p_ref_forget: torch.Tensor,
    beta: float,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """−(2/β)·mean log σ(β·[(log π_θ − log π_ref)(y_idk) − (log π_θ − log π_ref)(y_f)]) over sequences.

    All four are sequence log-probabilities [batch]; written with softplus(−x) = −log σ(x), which
    stays finite for any margin. `count`: the step's number of sequences (microbatches).
    """
    margin = (log_p_idk - log_p_ref_idk) - (log_p_forget - log_p_ref_forget)
    return (2.0 / beta) * mean_of(F.softplus(-beta * margin), count)


def _sub_batch(batch: Batch, prefix: str) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "labels")
    missing = [prefix + k for k in keys if prefix + k not in batch]
    if missing:
        raise ValueError(
            f"the DPO forget batch lacks {', '.join(missing)}: build it with get_method('DPO').collate_forget "
            "(run_unlearning does)"
        )
    return {k: batch[prefix + k] for k in keys}


def _log_p(model, batch: Batch) -> torch.Tensor:
    return -sequence_nll(forward_logits(model, batch), batch["labels"])[0]


@torch.no_grad()
def _log_p_ref(reference, batch: Batch) -> torch.Tensor:
    return -sequence_nll(reference_logits(reference, batch), batch["labels"])[0]


@register
class DPO(RetainWeighted):
    name = "DPO"
    aliases = ("IdkDPO",)
    needs_reference = True

    @dataclass(frozen=True)
    class Params:
        beta: float = 0.1  # β, inverse temperature of the preference loss (> 0)
        gamma: float = 1.0  # γ, weight of the forget (preference) term
        alpha: float = 1.0  # α, weight of the retain term; 0 drops it (and the need for a retain set)
        retain_loss: str = "nll"  # retain term: "nll" = CE(B_r), "kl" = KL(reference ‖ model) on B_r

        def __post_init__(self):
            check_positive("DPO", "beta", self.beta, "the loss divides by it")
            check_retain_loss(self.retain_loss)

    def collate_forget(
        self,
        tokenizer,
        pairs: Sequence[QAPair],
        params: Params,
        *,
        max_length: int = 512,
        generator: torch.Generator | None = None,
        idk_answers: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The forget batch plus, under `idk_*` keys, the same questions answered with idk lines.

        Line i of `idk_answers` (default: the packaged TOFU list) answers question j when
        `idk_index[j] == i`; the indices come from `generator` (seeded 0 when absent).
        """
        pairs = list(pairs)
        answers = load_idk_answers() if idk_answers is None else check_idk_answers(idk_answers)
        index = choose_idk(len(pairs), len(answers), generator)
        batch = collate(tokenizer, pairs, max_length)
        idk = collate(tokenizer, [(pair.question, answers[i]) for pair, i in zip(pairs, index)], max_length)
        batch.update({IDK_PREFIX + key: value for key, value in idk.items()})
        batch[IDK_PREFIX + "index"] = torch.tensor(index, dtype=torch.long)
        return batch

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Params) -> torch.Tensor:
        idk_batch = _sub_batch(forget_batch, IDK_PREFIX)
        forget_term = dpo_forget_loss(
            _log_p(model, idk_batch),
            _log_p_ref(reference, idk_batch),
            _log_p(model, forget_batch),
            _log_p_ref(reference, forget_batch),
            params.beta,
            forget_batch.get(SEQUENCES),
        )
        return self.with_retain(forget_term, model, reference, retain_batch, params)
