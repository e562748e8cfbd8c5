"""The interface every inner unlearning method implements, and the loss pieces they share.

A method is a small stateless class:

- `name`: its registry name;
- `Params`: a frozen dataclass of its hyperparameters, each with a default;
- `needs_reference` / `needs_retain`: whether it reads the frozen reference model and a retain
  batch (`uses_reference(params)` / `uses_retain(params)` refine this per configuration, e.g.
  GradDiff needs the reference only with `retain_loss="kl"`, and no method needs a retain
  batch when its retain weight α is 0);
- `loss(model, reference, forget_batch, retain_batch, params)`: the scalar to minimise, where
  batches are `pum.common.qa.collate` dicts (input_ids, attention_mask, labels) on the device.

Notation (DESIGN.md §6): NLL(y|x) sums answer-token negative log-likelihoods, CE is the mean over
all answer tokens of a batch, log π = −NLL.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from pum.common.qa import IGNORE_INDEX, token_nll

Batch = Mapping[str, torch.Tensor]

RETAIN_LOSSES = ("nll", "kl")


class UnlearningMethod:
    """Base class of the inner methods; subclasses set the class attributes and `loss`."""

    name: ClassVar[str]
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


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE: the mean next-token NLL over all answer tokens of the batch."""
    return token_nll(logits, labels).sum() / answer_mask(labels).sum().clamp(min=1)


def answer_kl(reference_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) of the next-token distributions, mean over the batch's answer tokens."""
    log_p = F.log_softmax(logits[:, :-1, :].float(), dim=-1)
    log_q = F.log_softmax(reference_logits[:, :-1, :].float(), dim=-1)
    per_token = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(dim=-1)
    mask = answer_mask(labels)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def retain_loss(model, reference, retain_batch: Batch, kind: str = "nll") -> torch.Tensor:
    """L_ret: CE(B_r) for `nll`, KL(reference ‖ model) on B_r's answer tokens for `kl`."""
    check_retain_loss(kind)
    if retain_batch is None:
        raise ValueError("this method's retain term needs a retain batch, but none was given")
    logits = forward_logits(model, retain_batch)
    if kind == "nll":
        return answer_ce(logits, retain_batch["labels"])
    return answer_kl(reference_logits(reference, retain_batch), logits, retain_batch["labels"])
