"""What a job may ask its workers to run: the inner methods, their hyperparameters, the trainer's keys.

The server checks a job against this catalogue at creation (it never imports `pum.client`:
DESIGN.md §1), so a misspelt method, an unknown or ill-typed hyperparameter, or a method whose
retain term needs a retain set the data owner does not have is a 400 before anything is stored,
not a failure on every worker later. The client's registry refuses to register a method that does
not match its entry here (`pum.client.methods.registry.register`), and a test checks the trainer's
keys against `TrainConfig`, so the catalogue and the code cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput

KINDS = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,)}
KIND_TEXT = {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false"}
RETAIN_LOSSES = ("nll", "kl")


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its name, kind, default, whether None is allowed, and its allowed values."""

    name: str
    kind: str  # a key of KINDS; a float also takes an int (JSON and YAML write 1 for 1.0)
    default: Any
    optional: bool = False
    choices: tuple[str, ...] = ()

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this parameter (None: nothing)."""
        if value is None and self.optional:
            return None
        if (isinstance(value, bool) and self.kind != "bool") or not isinstance(value, KINDS[self.kind]):
            allowed = KIND_TEXT[self.kind] + (" or null" if self.optional else "")
            return f"{self.name} must be {allowed} (got {_short(value)})"
        if self.choices and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)} (got {_short(value)})"
        return None


@dataclass(frozen=True)
class MethodEntry:
    """An inner method: its registry name, aliases, parameters, and the parameter whose non-zero
    value makes it read a retain batch (None: it never does)."""

    name: str
    params: tuple[Param, ...]
    aliases: tuple[str, ...] = ()
    retain_weight: str | None = "alpha"

    def needs_retain(self, values: Mapping[str, Any]) -> bool:
        """Whether the method reads a retain batch under these hyperparameters (α ≠ 0)."""
        if self.retain_weight is None:
            return False
        default = next(p.default for p in self.params if p.name == self.retain_weight)
        return values.get(self.retain_weight, default) != 0


def _weighted(*forget: Param, gamma: float = 1.0, alpha: float = 1.0) -> tuple[Param, ...]:
    """The parameters of a γ·L_f + α·L_ret method: its forget term's, then γ, α, retain_loss."""
    return (*forget, Param("gamma", "float", gamma), Param("alpha", "float", alpha),
            Param("retain_loss", "str", "nll", choices=RETAIN_LOSSES))


METHODS: dict[str, MethodEntry] = {entry.name: entry for entry in (
    MethodEntry("GradAscent", (), retain_weight=None),
    MethodEntry("GradDiff", _weighted()),
    MethodEntry("NPO", _weighted(Param("beta", "float", 0.1))),
    MethodEntry("CE-U", _weighted(alpha=0.0), aliases=("CEU",)),
    MethodEntry("DPO", _weighted(Param("beta", "float", 0.1)), aliases=("IdkDPO",)),
    MethodEntry("RMU", (Param("steering_coeff", "float", 2.0), Param("gamma", "float", 1.0),
                        Param("alpha", "float", 1.0), Param("layer", "int", None, optional=True),
                        Param("u_seed", "int", 0))),
    MethodEntry("SatImp", _weighted(Param("beta1", "float", 5.0), Param("beta2", "float", 1.0), gamma=0.1)),
    MethodEntry("SimNPO", _weighted(Param("beta", "float", 4.5), Param("delta", "float", 0.0), gamma=0.125)),
    MethodEntry("UNDIAL", _weighted(Param("beta", "float", 10.0), alpha=0.0)),
    MethodEntry("WGA", _weighted(Param("beta", "float", 1.0))),
)}

# The worker's training loop keys (pum.client.trainer.TrainConfig; a test keeps them in step).
TRAINER_PARAMS: tuple[Param, ...] = (
    Param("lr", "float", 5e-5), Param("optimizer", "str", "adamw", choices=("adamw", "sgd")),
    Param("weight_decay", "float", 0.01), Param("batch_size", "int", 32), Param("warmup_steps", "int", 0),
    Param("warmup_epochs", "float", None, optional=True),
    Param("schedule", "str", "constant", choices=("constant", "linear")), Param("max_length", "int", 512),
    Param("seed", "int", 0), Param("max_grad_norm", "float", 1.0, optional=True),
    Param("carry_reference", "bool", True), Param("carry_optimizer", "bool", True),
    Param("global_schedule", "bool", True), Param("gradient_accumulation_steps", "int", 1),
    Param("gradient_checkpointing", "bool", False), Param("bf16_autocast", "bool", False),
)


def known_names() -> str:
    aliases = sorted(alias for entry in METHODS.values() for alias in entry.aliases)
    return f"{', '.join(sorted(METHODS))} (aliases: {', '.join(aliases)})"


def find_method(name: str) -> MethodEntry:
    """The entry of a method name or alias, case-insensitively; InvalidInput listing the known names."""
    for entry in METHODS.values():
        if name.lower() in (entry.name.lower(), *(alias.lower() for alias in entry.aliases)):
            return entry
    raise InvalidInput(f"unknown inner_handler {_short(name)}; known methods: {known_names()}")


def check_task(method: str, hyperparams: Mapping[str, Any], retain: bool) -> MethodEntry:
    """Refuse (InvalidInput, every problem at once) a method and hyperparameters a worker would refuse:
    an unknown method, unknown or ill-typed keys, or a retain term without a retain set (`retain`
    False: the data owner has none)."""
    entry = find_method(method)
    params = {p.name: p for p in (*TRAINER_PARAMS, *entry.params)}
    problems = []
    unknown = [key for key in hyperparams if key not in params]
    if unknown:
        problems.append(
            f"unknown hyperparameter(s) {', '.join(_short(k) for k in unknown[:10])} for method {entry.name}; known: "
            f"{', '.join(p.name for p in TRAINER_PARAMS)} (trainer) and "
            f"{', '.join(p.name for p in entry.params) or 'none'} ({entry.name})")
    problems += [problem for key, value in hyperparams.items() if key in params
                 for problem in [params[key].problem(value)] if problem]
    if not problems and not retain and entry.needs_retain(hyperparams):
        weight = entry.retain_weight
        value = hyperparams.get(weight, params[weight].default)
        problems.append(f"{entry.name} with {weight} = {value:g} trains on a retain set, and this job has none "
                        f"(retain: false): set hyperparams.{weight} to 0, choose a method without a retain term, "
                        "or set retain: true if the data owner has a retain set")
    if problems:
        raise InvalidInput("; ".join(problems))
    return entry


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
