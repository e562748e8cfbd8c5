"""open-unlearning's argument names, accepted wherever PUM's are: the one table (README "Coming from open-unlearning").

| open-unlearning (trainer.args / method_args)   | PUM                                   | values                          |
|------------------------------------------------|---------------------------------------|---------------------------------|
| learning_rate                                  | lr                                    |                                 |
| per_device_train_batch_size × gradient_accumulation_steps | batch_size (one device)    | HF defaults 8 and 1             |
| gradient_accumulation_steps                    | the same name: passes per step        | kept, as in HF                  |
| lr_scheduler_type                              | schedule                              | linear, constant(_with_warmup)  |
| optim                                          | optimizer                             | adamw_torch, adamw_torch_fused, adamw_hf, paged_adamw_32bit → adamw; sgd |
| num_train_epochs                               | local_epochs (a job setting, `pum:`)  |                                 |
| retain_loss_type                               | retain_loss                           | NLL → nll, KL → kl              |
| weight_decay, warmup_steps, warmup_epochs, seed, beta, alpha, gamma, delta, beta1, beta2, steering_coeff | the same names | |

An alias and its PUM name both given is an error, never a silent choice. `gradient_accumulation_steps`
means what it means in Hugging Face's trainer, the passes a step's batch is computed in, and is kept:
with `per_device_train_batch_size` (or without `batch_size`) it also sizes the batch; beside PUM's
`batch_size` it only splits it. `canonical_hyperparams`
rewrites a hyperparameter mapping (the trainer calls it, so `pum unlearn` and workers accept both
spellings); `canonical_job` also moves `num_train_epochs` to the job's `local_epochs` (the job
file loader and the server's job creation call it, before the settings are validated).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pum.common.errors import InvalidInput

ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "lr_scheduler_type": "schedule",
    "optim": "optimizer",
    "retain_loss_type": "retain_loss",
}
VALUES: dict[str, dict[str, str]] = {
    "lr_scheduler_type": {"linear": "linear", "constant": "constant", "constant_with_warmup": "constant"},
    "optim": {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
              "paged_adamw_32bit": "adamw", "sgd": "sgd"},
    "retain_loss_type": {"NLL": "nll", "KL": "kl"},
}
BATCH = ("per_device_train_batch_size", "gradient_accumulation_steps")
HF_BATCH_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}  # TrainingArguments'
EPOCHS = ("num_train_epochs", "local_epochs", "PUM_LOCAL_EPOCHS")  # open-unlearning's, PUM's, its variable


def _both(alias: str, name: str) -> InvalidInput:
    return InvalidInput(f"{alias} (open-unlearning's name) and {name} (PUM's) are the same setting: give one of them")


def canonical_hyperparams(hyperparams: Mapping[str, Any]) -> dict[str, Any]:
    """`hyperparams` with open-unlearning's trainer and method names turned into PUM's (see the table)."""
    out = dict(hyperparams)
    per_device, accumulation = BATCH
    if per_device in out or (accumulation in out and "batch_size" not in out):
        if "batch_size" in out:
            raise _both(per_device, "batch_size")
        sizes = {key: out.get(key, default) for key, default in HF_BATCH_DEFAULTS.items()}
        for key, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"{key} must be an integer ≥ 1 (got {value!r})")
        out.pop(per_device, None)  # gradient_accumulation_steps stays: the trainer runs the batch in that many passes
        out["batch_size"] = sizes[per_device] * sizes[accumulation]
    for alias, name in ALIASES.items():
        if alias not in out:
            continue
        if name in out:
            raise _both(alias, name)
        value = out.pop(alias)
        if alias in VALUES:
            if not isinstance(value, str) or value not in VALUES[alias]:
                raise InvalidInput(f"{alias} must be one of {', '.join(VALUES[alias])} (got {value!r})")
            value = VALUES[alias][value]
        out[name] = value
    return out


def canonical_job(pum: Mapping[str, Any], hyperparams: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PUM settings, hyperparameters) with open-unlearning's names turned into PUM's, `num_train_epochs` moved
    from the hyperparameters to the settings' `local_epochs`."""
    pum, hyperparams = dict(pum), canonical_hyperparams(hyperparams)
    if "num_train_epochs" in hyperparams:
        given = [key for key in EPOCHS[1:] if key in pum]
        if given:
            raise _both("num_train_epochs", given[0])
        pum["local_epochs"] = hyperparams.pop("num_train_epochs")
    return pum, hyperparams
