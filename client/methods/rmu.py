"""RMU: Representation Misdirection for Unlearning.

Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning"
(arXiv:2403.03218), §5. At one middle layer ℓ, the forget term steers the model's hidden states
on forget text towards a fixed random direction, scaled by c; the retain term keeps the hidden
states on retain text where the frozen reference has them:

    L_f   = mean over non-pad tokens t of B_f of ‖h_θ^ℓ(t) − c·u‖² / d
    L_ret = mean over non-pad tokens t of B_r of ‖h_θ^ℓ(t) − h_ref^ℓ(t)‖² / d
    L     = γ·L_f + α·L_ret

d is the hidden size, so both are element-wise MSEs (the paper's `mse_loss`), averaged over the
batch's tokens; as in the paper, every non-pad token counts (prompt and answer), not only the
answer. u is a unit vector drawn once from U[0, 1)^d and normalised, as in the WMDP code, from a
generator seeded with `u_seed`, so every worker (and every round) steers towards the same u.

Layer: `layer` indexes `transformers`' `output_hidden_states` tuple, where 0 is the embeddings
and k the output of decoder block k (1-based), i.e. the residual stream after k blocks. The
default `None` takes n_layers // 2 (at least 1): the output of the middle block. The last
index, n_layers, is allowed but is the final-norm output in `transformers`' Llama.

Differences from the paper, kept on purpose: every trainable parameter is updated (the paper
updates three MLPs below ℓ; the trainer here owns the optimiser), and c = 2 by default
(DESIGN.md §6; the paper tunes c per model, e.g. 6.5 for Zephyr-7B, with α in the hundreds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TOKENS, Batch, UnlearningMethod, check_int, check_positive
from .registry import register


def random_unit_vector(dim: int, seed: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """u: U[0, 1)^dim from a CPU generator seeded with `seed`, divided by its norm (WMDP's choice)."""
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (u / u.norm()).to(dtype)


def masked_mse(
    hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the masked tokens (or the step's `count` of them) and the hidden dimensions of (hidden − target)²;
    `target` broadcasts.

    hidden [batch, seq, d]; target [batch, seq, d] or [d]; mask [batch, seq] (1 or True = counted).
    """
    weights = mask.to(torch.float32).unsqueeze(-1)
    squared = (hidden.float() - target.float()) ** 2
    tokens = weights.sum().clamp(min=1) if count is None else count
    return (squared * weights).sum() / (tokens * hidden.size(-1))


def rmu_forget_loss(
    hidden: torch.Tensor, mask: torch.Tensor, u: torch.Tensor, steering_coeff: float, count: torch.Tensor | None = None
) -> torch.Tensor:
    """L_f: MSE between the hidden states on the forget batch and c·u, over its non-pad tokens."""
    return masked_mse(hidden, steering_coeff * u, mask, count)


def rmu_retain_loss(
    hidden: torch.Tensor, reference_hidden: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None
) -> torch.Tensor:
    """L_ret: MSE between the model's and the reference's hidden states on the retain batch."""
    return masked_mse(hidden, reference_hidden, mask, count)


def layer_index(n_layers: int, layer: int | None) -> int:
    """The `output_hidden_states` index to read: `layer`, or n_layers // 2 (at least 1) when None."""
    index = max(1, n_layers // 2) if layer is None else layer
    if not 1 <= index <= n_layers:
        raise ValueError(f"RMU layer must be in 1..{n_layers} for this {n_layers}-block model (got {layer})")
    return index


def hidden_states(model, batch: Batch, layer: int | None) -> torch.Tensor:
    """The hidden states [batch, seq, d] after `layer_index(…, layer)` decoder blocks."""
    states = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    ).hidden_states
    return states[layer_index(len(states) - 1, layer)]


@register
class RMU(UnlearningMethod):
    name = "RMU"
    needs_reference = True  # for the retain term; see uses_reference
    needs_retain = True  # unless alpha = 0

    @dataclass(frozen=True)
    class Params:
        steering_coeff: float = 2.0  # c, the norm of the target c·u of the forget hidden states (> 0)
        gamma: float = 1.0  # γ, weight of the forget (steering) term
        alpha: float = 1.0  # α, weight of the retain term (MSE to the reference's hidden states); 0 drops it
        layer: int | None = None  # hidden_states index (0 = embeddings, k = after block k); None = n_layers // 2
        u_seed: int = 0  # seeds the random direction u; keep it equal across workers and rounds

        def __post_init__(self):
            check_positive("RMU", "steering_coeff", self.steering_coeff, "c·u is the forget target")
            if self.layer is not None:
                check_int("RMU", "layer", self.layer, least=1)
            check_int("RMU", "u_seed", self.u_seed, least=0)

    def uses_reference(self, params: Params) -> bool:
        return self.uses_retain(params)

    def uses_retain(self, params: Params) -> bool:
        return params.alpha != 0

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Params) -> torch.Tensor:
        hidden = hidden_states(model, forget_batch, params.layer)
        u = random_unit_vector(hidden.size(-1), params.u_seed).to(hidden.device)
        forget_term = rmu_forget_loss(hidden, forget_batch["attention_mask"], u, params.steering_coeff,
                                      forget_batch.get(TOKENS))
        if not self.uses_retain(params):
            return params.gamma * forget_term
        if retain_batch is None:
            raise ValueError("RMU's retain term needs a retain batch, but none was given (or set alpha to 0)")
        if reference is None:
            raise ValueError("RMU's retain term needs the reference model, but none was given")
        retain_hidden = hidden_states(model, retain_batch, params.layer)
        with torch.no_grad():
            reference_hidden = hidden_states(reference, retain_batch, params.layer)
        retain_term = rmu_retain_loss(retain_hidden, reference_hidden, retain_batch["attention_mask"],
                                      retain_batch.get(TOKENS))
        return params.gamma * forget_term + params.alpha * retain_term
