"""Inner unlearning methods that a worker runs on its copy (DESIGN.md §6).

Each method is a small class registered by name: `get_method("NPO")` returns it,
`parse_params(method, {"beta": 0.2})` builds its hyperparameters, and
`method.loss(model, reference, forget_batch, retain_batch, params)` is the loss to minimise.
"""

from .base import UnlearningMethod, answer_ce, answer_kl, frozen_reference, parse_params, retain_loss
from .registry import available_methods, get_method, register

# Importing a method's module registers it.
from . import grad_ascent, grad_diff, npo  # noqa: E402,F401  isort: skip

__all__ = [
    "UnlearningMethod",
    "answer_ce",
    "answer_kl",
    "available_methods",
    "frozen_reference",
    "get_method",
    "parse_params",
    "register",
    "retain_loss",
]
