"""open-unlearning's trainer and method names → PUM's: the one table, and both spellings at once refused."""

from __future__ import annotations

import pytest

from pum.common.aliases import canonical_hyperparams, canonical_job
from pum.common.errors import InvalidInput

# open-unlearning's TOFU NPO experiment (configs/experiment/unlearn/tofu/default.yaml + trainer/NPO.yaml)
OPEN_UNLEARNING_NPO = {"learning_rate": 1e-5, "weight_decay": 0.01, "num_train_epochs": 10, "warmup_epochs": 1.0,
                       "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4, "lr_scheduler_type": "linear",
                       "optim": "paged_adamw_32bit", "beta": 0.1, "alpha": 1.0, "gamma": 1.0, "retain_loss_type": "NLL"}


def test_open_unlearnings_npo_experiment_in_pums_names():
    pum, hyper = canonical_job({"inner_handler": "NPO"}, OPEN_UNLEARNING_NPO)
    assert pum == {"inner_handler": "NPO", "local_epochs": 10}
    assert hyper == {"lr": 1e-5, "weight_decay": 0.01, "warmup_epochs": 1.0, "batch_size": 32, "schedule": "linear",
                     "gradient_accumulation_steps": 4,  # 4 passes of 8 per step, as in open-unlearning
                     "optimizer": "adamw", "beta": 0.1, "alpha": 1.0, "gamma": 1.0, "retain_loss": "nll"}


def test_pums_own_names_pass_unchanged_and_hf_batch_defaults_apply():
    own = {"lr": 1e-4, "batch_size": 16, "retain_loss": "kl"}
    assert canonical_hyperparams(own) == own
    assert canonical_hyperparams({"gradient_accumulation_steps": 4}) == {"batch_size": 32,  # 8 per device (HF default)
                                                                         "gradient_accumulation_steps": 4}
    assert canonical_hyperparams({"per_device_train_batch_size": 2}) == {"batch_size": 2}
    # Beside PUM's batch_size, gradient_accumulation_steps only splits it (the same name, the same meaning as HF's).
    assert canonical_hyperparams({"batch_size": 32, "gradient_accumulation_steps": 4}) == {
        "batch_size": 32, "gradient_accumulation_steps": 4}


@pytest.mark.parametrize("hyper, phrase", [
    ({"learning_rate": 1e-5, "lr": 1e-5}, "learning_rate \\(open-unlearning's name\\) and lr \\(PUM's\\) are the same"),
    ({"per_device_train_batch_size": 8, "batch_size": 32}, "per_device_train_batch_size .* and batch_size"),
    ({"retain_loss_type": "NLL", "retain_loss": "nll"}, "retain_loss_type .* and retain_loss"),
    ({"retain_loss_type": "EMBED"}, "retain_loss_type must be one of NLL, KL"),
    ({"optim": "adamw_8bit"}, "optim must be one of"),
    ({"optim": ["adamw_torch"]}, "optim must be one of"),  # not a crash on an unhashable value
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer ≥ 1"),
])
def test_conflicts_and_unknown_values_are_refused(hyper, phrase):
    with pytest.raises(InvalidInput, match=phrase):
        canonical_hyperparams(hyper)


def test_epochs_given_twice_is_refused():
    for pum in ({"local_epochs": 5}, {"PUM_LOCAL_EPOCHS": 5}):
        with pytest.raises(InvalidInput, match="num_train_epochs .* and (local_epochs|PUM_LOCAL_EPOCHS)"):
            canonical_job(pum, {"num_train_epochs": 10})
