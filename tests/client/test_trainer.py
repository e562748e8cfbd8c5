"""The local unlearning loop: config from a TaskSpec, step planning, schedule, training behaviour."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pum.client.trainer import Carried, TrainConfig, planned_steps, run_unlearning, steps_of_round
from pum.common.qa import collate, sequence_nll
from pum.common.schemas import TaskSpec

torch.set_num_threads(1)


@torch.no_grad()
def mean_answer_nll(model, tokenizer, pairs) -> float:
    batch = collate(tokenizer, pairs)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_nll(logits, batch["labels"])[0].mean().item()


# --- configuration ------------------------------------------------------------------------------


def test_from_task_splits_loop_keys_from_method_params():
    task = TaskSpec(
        method="npo",
        epochs=10,
        max_steps=None,
        rounds=2,
        hyperparams={"lr": 1, "batch_size": 8, "schedule": "linear", "warmup_steps": 3, "seed": 7, "beta": 0.2},
    )
    config = TrainConfig.from_task(task)
    assert (config.method, config.epochs, config.max_steps, config.rounds) == ("NPO", 10, None, 2)
    assert (config.lr, config.batch_size, config.schedule, config.warmup_steps, config.seed) == (1.0, 8, "linear", 3, 7)
    assert dict(config.params) == {"beta": 0.2}
    assert (config.optimizer, config.weight_decay, config.max_length) == ("adamw", 0.01, 512)


def test_from_task_reads_the_carry_flags_and_reparameterization_turns_optimizer_carrying_off():
    hyper = {"max_grad_norm": 2, "carry_reference": False, "global_schedule": False}
    config = TrainConfig.from_task(TaskSpec(method="NPO", epochs=1, rounds=2, hyperparams=hyper))
    assert (config.max_grad_norm, config.carry_reference, config.carry_optimizer, config.global_schedule) == (
        2.0, False, True, False)
    rotated = TrainConfig.from_task(TaskSpec(method="NPO", epochs=1, rounds=2, reparameterized=True))
    assert rotated.carry_optimizer is False and rotated.carry_reference is True  # the function is preserved
    assert TrainConfig.from_task(TaskSpec(method="NPO", epochs=1, rounds=1, hyperparams={"max_grad_norm": None})
                                 ).max_grad_norm is None
    with pytest.raises(ValueError, match="carry_optimizer must be true or false"):
        TrainConfig(method="NPO", carry_optimizer="yes")


def test_from_task_refuses_unknown_keys_listing_the_allowed_ones():
    task = TaskSpec(method="GradDiff", epochs=5, rounds=1, hyperparams={"lr": 1e-5, "beta": 0.1})
    with pytest.raises(ValueError) as err:
        TrainConfig.from_task(task)
    message = str(err.value)
    assert "'beta'" in message and "GradDiff" in message
    assert all(key in message for key in ("gamma", "alpha", "retain_loss", "lr", "batch_size", "seed"))


def test_from_task_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="known methods: .*GradAscent"):
        TrainConfig.from_task(TaskSpec(method="Forgetful", epochs=1, rounds=1))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"params": {"betta": 1}}, "betta"), ({"optimizer": "adam"}, "optimizer"), ({"schedule": "cosine"}, "schedule"),
     ({"batch_size": 0}, "batch_size"), ({"max_steps": 0}, "max_steps"), ({"lr": 0.0}, "lr")],
)
def test_config_refuses_bad_values(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainConfig(method="NPO", **kwargs)


def test_config_params_cannot_be_changed_behind_its_back():
    params = {"beta": 0.2}
    config = TrainConfig(method="NPO", params=params)
    params["beta"] = 5.0
    assert config.params["beta"] == 0.2
    with pytest.raises(TypeError):
        config.params["beta"] = 1.0


@pytest.mark.parametrize(
    "n_forget, batch_size, epochs, rounds, max_steps, global_schedule, expected",
    [
        (400, 32, 5, 1, None, True, [65]),  # 13 batches per epoch × 5 epochs
        (400, 32, 5, 2, None, True, [32, 33]),  # ⌊65/2⌋, then ⌊130/2⌋ − ⌊65/2⌋: 65 in all, as the baseline
        (400, 32, 5, 2, None, False, [33, 33]),  # the old split: ⌈65/2⌉ each, 66 in all
        (400, 32, 5, 5, None, True, [13] * 5),  # one epoch per copy
        (400, 32, 10, 4, None, True, [32, 33, 32, 33]),
        (40, 32, 2, 5, None, True, [0, 1, 1, 1, 1]),  # T = 4 < R: a round may train no step
        (100, 10, 0.3, 1, None, True, [3]),  # exact rationals: 0.3 × 10, not 3.0000000000000004 → 4
        (400, 32, 5, 2, 7, True, [7, 7]),  # max_steps wins
    ],
)
def test_planned_steps_split_the_baselines_steps_over_rounds(n_forget, batch_size, epochs, rounds, max_steps,
                                                            global_schedule, expected):
    configs = [TrainConfig(method="GradAscent", batch_size=batch_size, epochs=epochs, rounds=rounds, round=r,
                           max_steps=max_steps, global_schedule=global_schedule) for r in range(1, rounds + 1)]
    assert [planned_steps(c, n_forget) for c in configs] == expected


def test_rounds_tile_the_baselines_steps_exactly():
    for rounds in (1, 2, 3, 4, 5, 7):
        configs = [TrainConfig(method="GradAscent", batch_size=32, epochs=10, rounds=rounds, round=r)
                   for r in range(1, rounds + 1)]
        steps = [list(steps_of_round(c, 400)) for c in configs]
        assert sum(steps, []) == list(range(130))


# --- running ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, params",
    [("GradAscent", {}), ("GradDiff", {}), ("GradDiff", {"retain_loss": "kl"}), ("NPO", {}), ("NPO", {"alpha": 0})],
)
def test_one_sgd_step_raises_the_forget_answer_nll(make_model, tokenizer, forget_pairs, retain_pairs, method, params):
    model = make_model(0)
    before = mean_answer_nll(model, tokenizer, forget_pairs)
    config = TrainConfig(
        method=method, params=params, optimizer="sgd", lr=1e-2, weight_decay=0.0, batch_size=len(forget_pairs), max_steps=1
    )
    metrics = run_unlearning(model, tokenizer, forget_pairs, retain_pairs, config)
    assert metrics["steps"] == 1
    assert mean_answer_nll(model, tokenizer, forget_pairs) > before  # the forget answers became less likely


def test_run_returns_metrics_and_logs_every_step(model, tokenizer, forget_pairs, retain_pairs):
    records = []
    config = TrainConfig(method="NPO", lr=1e-3, batch_size=4, epochs=3, schedule="linear", warmup_steps=1)
    metrics = run_unlearning(model, tokenizer, forget_pairs, retain_pairs, config, log=records.append, progress=True)
    assert metrics["steps"] == planned_steps(config, len(forget_pairs)) == 6
    assert set(metrics) == {"steps", "first_step", "total_steps", "seconds", "first_loss", "last_loss", "method"}
    assert metrics["method"] == "NPO" and (metrics["first_step"], metrics["total_steps"]) == (0, 6)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert metrics["first_loss"] == records[0]["loss"] and metrics["last_loss"] == records[-1]["loss"]
    assert all(math.isfinite(r["loss"]) for r in records) and metrics["seconds"] >= 0
    assert [r["lr"] for r in records] == pytest.approx([5e-4, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4])
    assert all(0 < r["grad_norm"] for r in records)  # measured before clipping to max_grad_norm
    assert model.training  # its mode is restored
    assert all(p.grad is None for p in model.parameters())


def test_first_npo_loss_is_the_forget_term_at_the_reference_plus_retain(model, tokenizer, forget_pairs, retain_pairs):
    config = TrainConfig(method="NPO", params={"alpha": 0}, batch_size=len(forget_pairs), max_steps=1)
    metrics = run_unlearning(model, tokenizer, forget_pairs, None, config)
    assert metrics["first_loss"] == pytest.approx(20 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("method", ["GradDiff", "NPO"])
def test_a_method_that_needs_retain_data_refuses_none(model, tokenizer, forget_pairs, method):
    with pytest.raises(ValueError, match=method):
        run_unlearning(model, tokenizer, forget_pairs, None, TrainConfig(method=method, max_steps=1))
    with pytest.raises(ValueError, match=method):
        run_unlearning(model, tokenizer, forget_pairs, [], TrainConfig(method=method, max_steps=1))


def test_empty_forget_set_is_refused(model, tokenizer, retain_pairs):
    with pytest.raises(ValueError, match="forget set is empty"):
        run_unlearning(model, tokenizer, [], retain_pairs, TrainConfig(method="GradAscent"))


def test_same_inputs_and_seed_give_bit_identical_weights(make_model, tokenizer, forget_pairs, retain_pairs):
    config = TrainConfig(method="NPO", lr=1e-3, batch_size=4, max_steps=4, seed=3)  # AdamW; 6 pairs, so order matters
    first, second, other_seed = make_model(0), make_model(0), make_model(0)
    run_unlearning(first, tokenizer, forget_pairs, retain_pairs, config)
    run_unlearning(second, tokenizer, forget_pairs, retain_pairs, config)
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    run_unlearning(other_seed, tokenizer, forget_pairs, retain_pairs, dataclasses.replace(config, seed=4))
    c = other_seed.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_rounds_back_to_back_with_carried_state_replay_the_baseline(make_model, tokenizer, forget_pairs, retain_pairs,
                                                                    optimizer):
    # One copy per round, run back to back on the same weights with the carried reference and
    # optimiser state, must be the baseline: the same batches, learning rates, moments and reference.
    # 6 pairs in batches of 4 are 2 batches an epoch; 3 epochs over 4 rounds split the 6 steps 1, 2, 1, 2.
    baseline = TrainConfig(method="NPO", optimizer=optimizer, lr=1e-2, batch_size=4, epochs=3, seed=5,
                           schedule="linear", warmup_steps=2, max_grad_norm=0.5)
    once, in_rounds = make_model(0), make_model(0)
    run_unlearning(once, tokenizer, forget_pairs, retain_pairs, baseline)
    carried = Carried(reference=make_model(0).eval().requires_grad_(False))
    for r in (1, 2, 3, 4):
        run_unlearning(in_rounds, tokenizer, forget_pairs, retain_pairs,
                       dataclasses.replace(baseline, rounds=4, round=r), carried=carried)
    assert max_difference(once, in_rounds) < 1e-6


@pytest.mark.parametrize("change", [{"global_schedule": False}, {"carry_optimizer": False}, {"carry_reference": False}])
def test_each_carried_item_is_needed_to_replay_the_baseline(make_model, tokenizer, forget_pairs, retain_pairs, change):
    baseline = TrainConfig(method="NPO", lr=1e-2, batch_size=4, epochs=3, seed=5, schedule="linear")
    once, in_rounds = make_model(0), make_model(0)
    run_unlearning(once, tokenizer, forget_pairs, retain_pairs, baseline)
    config = dataclasses.replace(baseline, rounds=4, **change)
    reference = make_model(0).eval().requires_grad_(False) if config.carry_reference else None
    carried = Carried(reference=reference)
    for r in (1, 2, 3, 4):
        if not config.carry_optimizer:
            carried.optimizer_state = None
        run_unlearning(in_rounds, tokenizer, forget_pairs, retain_pairs, dataclasses.replace(config, round=r),
                       carried=carried)
    assert max_difference(once, in_rounds) > 1e-5


def test_a_carried_optimizer_state_of_another_model_is_refused(make_model, tokenizer, forget_pairs, retain_pairs):
    carried = Carried(optimizer_state={0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3, 3)}})
    with pytest.raises(ValueError, match="does not fit this model"):
        run_unlearning(make_model(0), tokenizer, forget_pairs, retain_pairs, TrainConfig(method="GradDiff", max_steps=1),
                       carried=carried)


def test_round_beyond_the_jobs_rounds_is_refused():
    with pytest.raises(ValueError, match="round must be ≤ rounds = 2"):
        TrainConfig(method="NPO", rounds=2, round=3)
    assert TrainConfig.from_task(TaskSpec(method="NPO", epochs=1, rounds=3), round_=2).round == 2


def test_training_leaves_the_global_rng_alone(model, tokenizer, forget_pairs):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_unlearning(model, tokenizer, forget_pairs, None, TrainConfig(method="GradAscent", max_steps=2, batch_size=4))
    assert torch.equal(torch.rand(3), expected)
