"""The interface every inner unlearning method implements, and the loss pieces they share.

A method is a small stateless class:

- `name`: its registry name, and `aliases`: other names it is found by (DPO's "IdkDPO");
- `Params`: a frozen dataclass of its hyperparameters, each with a default;
- `needs_reference` / `needs_retain`: whether it reads the frozen reference model and a retain
  batch (`uses_reference(params)` / `uses_retain(params)` refine this per configuration, e.g.
  GradDiff needs the reference only with `retain_loss="kl"`, and no method needs a retain
  batch when its retain weight α is 0);
- `loss(model, reference, forget_batch, retain_batch, params)`: the scalar to minimise, where
  batches are `pum.common.qa.collate` dicts (input_ids, attention_mask, labels) on the device;
- `collate_forget(tokenizer, pairs, params, ...)`: how the trainer builds a forget batch. The
  default is `collate`; a method that scores other texts too (DPO's "I don't know" answers) adds
  its own keys there, so `loss` stays a function of tensors.

`RetainWeighted` is the common shape L = γ·L_f + α·L_ret, with L_ret = CE(B_r) (`retain_loss="nll"`)
or KL(reference ‖ model) on B_r (`retain_loss="kl"`), and no retain batch needed when α = 0.

Notation (DESIGN.md §6): NLL(y|x) sums answer-token negative log-likelihoods, CE is the mean over
all answer tokens of a batch, log π = −NLL.

Microbatches. The trainer may split a step's batch into microbatches (gradient accumulation, and
the ranks of a multi-GPU worker: `pum.client.microbatch`). It then stores the whole step's counts
in each microbatch under `ANSWER_TOKENS`, `SEQUENCES` and `TOKENS`, and every mean a loss takes
divides its microbatch's sum by the step's count, so the microbatch losses add up to the step's
loss and their gradients to its gradient. Without those keys a batch is its own step.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from pum.common.qa import IGNORE_INDEX, QAPair, collate, token_nll

Batch = Mapping[str, torch.Tensor]

RETAIN_LOSSES = ("nll", "kl")

# The step's counts a microbatch carries (0-dim float tensors); absent: the batch is the whole step.
ANSWER_TOKENS = "step_answer_tokens"  # answer tokens (labels ≠ IGNORE_INDEX, after the shift): CE and token means
SEQUENCES = "step_sequences"  # rows: sequence means (NPO, DPO, SimNPO)
TOKENS = "step_tokens"  # attended tokens (attention_mask = 1): RMU's hidden-state MSEs


class UnlearningMethod:
    """Base class of the inner methods; subclasses set the class attributes and `loss`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()  # other registry names of the same method
    Params: ClassVar[type]
    needs_reference: ClassVar[bool] = False
    needs_retain: ClassVar[bool] = False

    def uses_reference(self, params: Any) -> bool:
        """Whether `loss` reads the reference model under these params."""
        return self.needs_reference

    def uses_retain(self, params: Any) -> bool:
        """Whether `loss` reads a retain batch under these params."""
        return self.needs_retain

    def loss(self, model, reference, forget_batch: Batch, retain_batch: Batch | None, params: Any) -> torch.Tensor:
        raise NotImplementedError

    def collate_forget(
        self,
        tokenizer,
        pairs: Sequence[QAPair],
        params: Any,
        *,
        max_length: int = 512,
        generator: torch.Generator | None = None,
        idk_answers: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The forget batch `loss` reads, built from `pairs` (CPU tensors).

        Every tensor of the batch has one row per pair (the trainer splits batches by rows into
        microbatches). The default is `collate(tokenizer, pairs, max_length)`. `generator` seeds any random choice
        a method makes per batch; `idk_answers` replaces the packaged "I don't know" lines for the
        methods that use them (DPO). Both are ignored by methods that need neither.
        """
        return collate(tokenizer, list(pairs), max_length)

    def __repr__(self) -> str:
        return f"<unlearning method {self.name}>"


def parse_params(method: UnlearningMethod, mapping: Mapping[str, Any] | None) -> Any:
    """`method.Params` built from a dict; ValueError naming unknown keys and listing the allowed ones.

    Numbers are accepted for float fields (JSON and YAML may write `1` for `1.0`); a value of the
    wrong kind is refused with the field's name.
    """
    if isinstance(mapping, method.Params):
        return mapping
    mapping = dict(mapping or {})
    fields = {f.name: f for f in dataclasses.fields(method.Params)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for method {method.name!r}; "
            f"allowed: {', '.join(fields) or '(none)'}"
        )
    values = {}
    for key, value in mapping.items():
        default = fields[key].default
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{method.name} parameter {key!r} must be a number (got {value!r})")
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{method.name} parameter {key!r} must be a string (got {value!r})")
        values[key] = value
    return method.Params(**values)


def check_retain_loss(kind: str) -> None:
    """ValueError unless `kind` is one of RETAIN_LOSSES."""
    if kind not in RETAIN_LOSSES:
        raise ValueError(f"retain_loss must be one of {', '.join(RETAIN_LOSSES)} (got {kind!r})")


def frozen_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of `model`: eval mode, no parameter requires grad."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def forward_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def reference_logits(reference: torch.nn.Module, batch: Batch) -> torch.Tensor:
    if reference is None:
        raise ValueError("this method needs the reference model, but none was given")
    return forward_logits(reference, batch)


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which next-token predictions [batch, seq-1] are scored: the answer tokens."""
    return labels[:, 1:] != IGNORE_INDEX


def mean_of(values: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """values.mean(), or Σ values / count: the microbatch's share of a mean over the step's `count` items."""
    return values.mean() if count is None else values.sum() / count


def answer_ce(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """CE: the mean next-token NLL over all answer tokens of the batch (over the step's `count` of them when given)."""
    total = token_nll(logits, labels).sum()
    return total / (answer_mask(labels).sum().clamp(min=1) if count is None else count)


def answer_kl(
    reference_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(reference ‖ model) of the next-token distributions, mean over the batch's answer tokens (or the step's `count`)."""
    log_p = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    log_q = F.log_softmax(reference_logits[:, :-1, :].float(), dim=-1)
    per_token = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(dim=-1)
    mask = answer_mask(labels)
    return (per_token * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)


def retain_loss(model, reference, retain_batch: Batch, kind: str = "nll") -> torch.Tensor:
    """L_ret: CE(B_r) for `nll`, KL(reference ‖ model) on B_r's answer tokens for `kl`."""
    check_retain_loss(kind)
    if retain_batch is None:
        raise ValueError("this method's retain term needs a retain batch, but none was given")
    logits = forward_logits(model, retain_batch)
    count = retain_batch.get(ANSWER_TOKENS)
    if kind == "nll":
        return answer_ce(logits, retain_batch["labels"], count)
    return answer_kl(reference_logits(reference, retain_batch), logits, retain_batch["labels"], count)


class RetainWeighted(UnlearningMethod):
    """A method whose loss is γ·L_f + α·L_ret; its Params have `gamma`, `alpha` and `retain_loss`.

    `needs_reference` says whether the forget term reads the reference; the retain term adds that
    need under `retain_loss="kl"`. α = 0 drops the retain term and the need for a retain batch.
    """

    needs_retain = True  # unless alpha = 0

    def uses_retain(self, params: Any) -> bool:
        return params.alpha != 0

    def uses_reference(self, params: Any) -> bool:
        return self.needs_reference or (self.uses_retain(params) and params.retain_loss == "kl")

    def with_retain(self, forget_term: torch.Tensor, model, reference, retain_batch: Batch | None, params: Any) -> torch.Tensor:
        """γ·forget_term + α·L_ret, or γ·forget_term alone when α = 0."""
        if not self.uses_retain(params):
            return params.gamma * forget_term
        return params.gamma * forget_term + params.alpha * retain_loss(model, reference, retain_batch, params.retain_loss)


def check_positive(method: str, name: str, value: float, why: str) -> None:
    """ValueError unless `value` > 0, saying why it must be."""
    if not value > 0:
        raise ValueError(f"{method} {name} must be > 0 (got {value}): {why}")


def check_int(method: str, name: str, value: Any, least: int | None = None) -> None:
    """ValueError unless `value` is an int (not a bool), at least `least` when given."""
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        bound = f" ≥ {least}" if least is not None else ""
        raise ValueError(f"{method} {name} must be an integer{bound} (got {value!r})")


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token logits [n, vocab] (float32) at the batch's n answer positions, and their targets [n]."""
    mask = answer_mask(labels)
    return logits[:, :-1, :].float()[mask], labels[:, 1:][mask]


def weighted_ascent_loss(
    nll: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, count: torch.Tensor | None = None
) -> torch.Tensor:
    """−mean over the batch's answer tokens (or the step's `count`) of w_t·NLL_t: token-weighted gradient ascent.

    `nll` and `weights` are [batch, seq-1] (as from `token_nll`); the weights are detached here,
    so they scale each token's ascent step without being optimised themselves.
    """
    mask = answer_mask(labels)
    return -(weights.detach() * nll * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)
