"""Inner unlearning methods that a worker runs on its copy (DESIGN.md §6).

Each method is a small class registered by name: `get_method("NPO")` returns it,
`parse_params(method, {"beta": 0.2})` builds its hyperparameters,
`method.collate_forget(tokenizer, pairs, params)` builds a forget batch, and
`method.loss(model, reference, forget_batch, retain_batch, params)` is the loss to minimise.

Registered: GradAscent, GradDiff, NPO, SimNPO, DPO (alias IdkDPO), RMU, UNDIAL, WGA, SatImp,
CE-U (alias CEU).
"""

from .base import UnlearningMethod, answer_ce, answer_kl, frozen_reference, parse_params, retain_loss
from .idk import load_idk_answers
from .registry import available_methods, get_method, register

# Importing a method's module registers it.
from . import grad_ascent, grad_diff, npo  # noqa: E402,F401  isort: skip
from . import ceu, dpo, rmu, satimp, simnpo, undial, wga  # noqa: E402,F401  isort: skip

__all__ = [
    "UnlearningMethod",
    "answer_ce",
    "answer_kl",
    "available_methods",
    "frozen_reference",
    "get_method",
    "load_idk_answers",
    "parse_params",
    "register",
    "retain_loss",
]
