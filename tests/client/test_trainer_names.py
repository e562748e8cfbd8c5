"""The trainer under open-unlearning's names: the same run as under PUM's, warm-up in epochs, and a chat prompt."""

from __future__ import annotations

import pytest
import torch

from pum.client.trainer import TrainConfig, lr_factor, run_unlearning
from pum.common.prompts import QAEncoder
from pum.common.schemas import TaskSpec

torch.set_num_threads(1)

PUM = {"lr": 1e-3, "batch_size": 4, "gradient_accumulation_steps": 2, "schedule": "linear", "optimizer": "adamw", "weight_decay": 0.01,
       "gamma": 1.0, "alpha": 1.0, "retain_loss": "nll", "beta": 0.1}
OPEN_UNLEARNING = {"learning_rate": 1e-3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                   "lr_scheduler_type": "linear", "optim": "adamw_torch", "weight_decay": 0.01,
                   "gamma": 1.0, "alpha": 1.0, "retain_loss_type": "NLL", "beta": 0.1}


def test_both_spellings_make_one_config_and_the_same_weights(make_model, tokenizer, forget_pairs, retain_pairs):
    configs = [TrainConfig.from_task(TaskSpec(method="NPO", epochs=2, rounds=1, hyperparams=h)) for h in (PUM, OPEN_UNLEARNING)]
    assert configs[0] == configs[1]
    weights = []
    for config in configs:
        model = make_model(0)
        run_unlearning(model, tokenizer, forget_pairs, retain_pairs, config)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_warmup_epochs_is_open_unlearnings_step_count(model, tokenizer, forget_pairs):
    # 6 forget pairs, batch 2: one epoch is 3 steps, so warmup_epochs = 1 warms up for ⌊1 · 6 / 2⌋ = 3 steps.
    task = TaskSpec(method="GradAscent", epochs=3, rounds=1,
                    hyperparams={"learning_rate": 1e-3, "per_device_train_batch_size": 2, "warmup_epochs": 1,
                                 "lr_scheduler_type": "linear"})
    config = TrainConfig.from_task(task)
    rows = []
    run_unlearning(model, tokenizer, forget_pairs, None, config, log=rows.append)
    assert [row["lr"] for row in rows] == pytest.approx([1e-3 * lr_factor(s, 9, 3, "linear") for s in range(9)])
    assert rows[2]["lr"] < rows[3]["lr"] == pytest.approx(1e-3)  # the peak right after three warm-up steps
    with pytest.raises(ValueError, match="warmup_epochs must be a number ≥ 0, and warmup_steps unset"):
        TrainConfig(method="GradAscent", warmup_epochs=1.0, warmup_steps=2)


def test_a_chat_encoder_trains_on_the_chat_prompt(make_model, chat_tokenizer, forget_pairs):
    # The same pairs under the two formats give different updates: the format reaches every batch.
    config = TrainConfig(method="GradAscent", lr=1e-3, batch_size=3, epochs=1, weight_decay=0.0)
    deltas = []
    for prompt_format in ("chat", "plain"):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, intermediate_size=32))
        before = model.model.embed_tokens.weight.detach().clone()
        run_unlearning(model, QAEncoder(chat_tokenizer, prompt_format), forget_pairs, None, config)
        deltas.append(model.model.embed_tokens.weight.detach() - before)
    header = chat_tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    assert deltas[0][header].abs().sum() > 0 and deltas[1][header].abs().sum() == 0  # only the chat prompt has headers
