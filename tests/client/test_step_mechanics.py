"""How a step is computed must not change the step: gradient accumulation gives the weights of the
whole batch for every method, gradient checkpointing changes nothing, and bf16 autocast is used only
where the device has it."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from pum.client.methods import available_methods
from pum.client.trainer import TrainConfig, bf16_autocast_on, run_unlearning
from pum.common.schemas import TaskSpec

torch.set_num_threads(1)


def trained(make_model, tokenizer, forget, retain, config) -> dict[str, torch.Tensor]:
    model = make_model(0)
    run_unlearning(model, tokenizer, forget, retain, config)
    return model.state_dict()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def update_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """max over tensors of ‖a − b‖/‖a − start‖: the gap against what training changed. AdamW's first steps are
    about lr·sign(g), so float rounding of near-zero gradients shows in the weights at ~1e-6 of the update."""
    return max(((a[k] - b[k]).norm() / (a[k] - start[k]).norm()).item() for k in a if (a[k] - start[k]).norm() > 1e-9)


@pytest.mark.parametrize("method", available_methods())
def test_accumulation_gives_the_weights_of_the_whole_batch(method, make_model, tokenizer, forget_pairs, retain_pairs):
    # 6 forget pairs in batches of 4: steps of 4 and 2 rows; 3 passes split them 2+1+1 and 1+1+stand-in.
    base = TrainConfig(method=method, optimizer="sgd", lr=0.5, batch_size=4, max_steps=4, seed=3, weight_decay=0.0)
    whole = trained(make_model, tokenizer, forget_pairs, retain_pairs, base)
    start = make_model(0).state_dict()
    assert max_difference(whole, start) > 1e-3  # the steps moved the weights: the comparison means something
    for passes in (2, 3):
        accumulated = trained(make_model, tokenizer, forget_pairs, retain_pairs,
                              dataclasses.replace(base, gradient_accumulation_steps=passes))
        assert max_difference(accumulated, whole) < 1e-6, passes


@pytest.mark.parametrize("method", ["NPO", "GradDiff", "DPO"])
def test_accumulation_with_adamw_and_clipping_matches_too(method, make_learned_model, tokenizer, forget_pairs,
                                                          retain_pairs):
    base = TrainConfig(method=method, lr=1e-2, batch_size=4, max_steps=3, seed=3, max_grad_norm=0.5)
    start = make_learned_model().state_dict()
    whole = trained(make_learned_model, tokenizer, forget_pairs, retain_pairs, base)
    assert max_difference(whole, start) > 1e-3
    accumulated = trained(make_learned_model, tokenizer, forget_pairs, retain_pairs,
                          dataclasses.replace(base, gradient_accumulation_steps=4))
    assert update_gap(accumulated, whole, start) < 5e-5  # measured ≤ 5.3e-6 (GradDiff)


def count_block_calls(model) -> list[int]:
    """Counts the runs of the first block's MLP (forward hooks do not fire in a checkpoint's recomputation)."""
    calls, mlp = [0], model.model.layers[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    mlp.forward = counted
    return calls


@pytest.mark.parametrize("method", ["NPO", "GradDiff", "RMU"])
def test_gradient_checkpointing_recomputes_and_changes_nothing(method, make_model, tokenizer, forget_pairs, retain_pairs):
    config = TrainConfig(method=method, lr=1e-2, batch_size=4, max_steps=2, seed=3)
    plain, checkpointed = make_model(0), make_model(0)
    plain_calls, checkpointed_calls = count_block_calls(plain), count_block_calls(checkpointed)
    run_unlearning(plain, tokenizer, forget_pairs, retain_pairs, config)
    run_unlearning(checkpointed, tokenizer, forget_pairs, retain_pairs,
                   dataclasses.replace(config, gradient_checkpointing=True))
    assert checkpointed_calls[0] > plain_calls[0]  # the block ran again in the backward: checkpointing was on
    assert max_difference(plain.state_dict(), checkpointed.state_dict()) < 1e-6
    assert not checkpointed.is_activation_checkpointing  # switched off again after the run


def test_bf16_autocast_is_float32_with_a_warning_where_the_device_has_none(make_model, tokenizer, forget_pairs,
                                                                           retain_pairs, caplog):
    config = TrainConfig(method="GradDiff", lr=1e-2, batch_size=4, max_steps=2, seed=3)
    plain = trained(make_model, tokenizer, forget_pairs, retain_pairs, config)
    with caplog.at_level(logging.WARNING, logger="pum.client.trainer"):
        asked = trained(make_model, tokenizer, forget_pairs, retain_pairs, dataclasses.replace(config, bf16_autocast=True))
    assert caplog.text.count("training in float32") == 1  # once per run, not per pass
    assert all(torch.equal(plain[k], asked[k]) for k in plain)
    assert all(t.dtype == torch.float32 for t in asked.values())


def test_autocast_is_off_unless_asked(caplog):
    with caplog.at_level(logging.WARNING, logger="pum.client.trainer"):
        assert bf16_autocast_on(torch.device("cpu"), False) is False
    assert caplog.text == ""


def test_the_step_settings_travel_in_the_jobs_hyperparams():
    hyper = {"gradient_accumulation_steps": 4, "gradient_checkpointing": True, "bf16_autocast": True}
    config = TrainConfig.from_task(TaskSpec(method="NPO", epochs=1, rounds=1, hyperparams=hyper))
    assert (config.gradient_accumulation_steps, config.gradient_checkpointing, config.bf16_autocast) == (4, True, True)
    default = TrainConfig(method="NPO")
    assert (default.gradient_accumulation_steps, default.gradient_checkpointing, default.bf16_autocast) == (1, False, False)


@pytest.mark.parametrize("bad, fragment", [({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
                                           ({"gradient_accumulation_steps": 2.0}, "gradient_accumulation_steps"),
                                           ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
                                           ({"bf16_autocast": 1}, "bf16_autocast")])
def test_bad_step_settings_are_refused(bad, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainConfig(method="NPO", **bad)


def test_pum_unlearn_takes_the_step_options_and_trains_float32_weights(tmp_path, make_model, tokenizer, forget_pairs,
                                                                       retain_pairs, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from pum.cli import main

    model_dir, out = tmp_path / "model", tmp_path / "out"
    make_model(0).to(torch.bfloat16).save_pretrained(model_dir)  # a bf16 checkpoint, as big models ship
    tokenizer.save_pretrained(model_dir)
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(json.dumps({"question": p.question, "answer": p.answer}) for p in forget_pairs))
    argv = ["unlearn", str(model_dir), "--forget", str(forget), "--out", str(out), "--method", "GradAscent",
            "--hyperparams", '{"lr": 0.01, "batch_size": 4, "gradient_accumulation_steps": 1}',
            "--gradient-accumulation-steps", "2", "--gradient-checkpointing", "--epochs", "1"]
    from pum.cli import build_parser
    from pum.client.cli import step_hyperparams

    assert step_hyperparams(build_parser().parse_args(argv)) == {"gradient_accumulation_steps": 2,
                                                                 "gradient_checkpointing": True}
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 2 and printed["method"] == "GradAscent"
    trained_model = AutoModelForCausalLM.from_pretrained(out)
    assert trained_model.dtype == torch.float32  # trained (and saved) in float32, not in the checkpoint's bf16
    original = make_model(0).to(torch.bfloat16).float().state_dict()
    assert any(not torch.equal(t, original[n]) for n, t in trained_model.state_dict().items())
