"""Microbatches add up to the step: for every method of the registry, the losses of a step's
microbatches sum to the step's loss and their gradients to its gradient, however the rows fall
(uneven slices, slots without rows, forget and retain batches of different sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from pum.client.methods import available_methods, frozen_reference, get_method, parse_params
from pum.client.methods.base import ANSWER_TOKENS, SEQUENCES, TOKENS
from pum.client.microbatch import microbatches, split_rows, step_counts
from pum.common.qa import collate

torch.set_num_threads(1)

# Every method with its defaults, plus the retain terms the defaults leave out.
CONFIGS = [(name, {}) for name in available_methods()] + [
    ("GradDiff", {"retain_loss": "kl"}), ("UNDIAL", {"alpha": 1.0}), ("CE-U", {"alpha": 1.0, "retain_loss": "kl"}),
]


def loss_and_grads(method, params, model, reference, forget, retain):
    model.zero_grad(set_to_none=True)
    loss = method.loss(model, reference, forget, retain, params)
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("slots", [2, 3, 5])
@pytest.mark.parametrize("name, overrides", CONFIGS, ids=[f"{n}{o or ''}" for n, o in CONFIGS])
def test_microbatch_losses_and_gradients_add_up_to_the_steps(name, overrides, slots, make_model, tokenizer,
                                                             forget_pairs, retain_pairs):
    method = get_method(name)
    params = parse_params(method, overrides)
    model = make_model(1)
    reference = frozen_reference(make_model(2)) if method.uses_reference(params) else None
    forget = method.collate_forget(tokenizer, forget_pairs[:4], params, generator=torch.Generator().manual_seed(0))
    retain = collate(tokenizer, retain_pairs[:3]) if method.uses_retain(params) else None

    loss, grads = loss_and_grads(method, params, model, reference, forget, retain)
    parts_loss, parts_grads = torch.zeros(()), [torch.zeros_like(g) for g in grads]
    retain_parts = split_rows(retain, slots) if retain is not None else [None] * slots
    for forget_part, retain_part in zip(split_rows(forget, slots), retain_parts):  # 5 slots: stand-ins on both sides
        part_loss, part_grads = loss_and_grads(method, params, model, reference, forget_part, retain_part)
        parts_loss += part_loss
        parts_grads = [a + b for a, b in zip(parts_grads, part_grads)]

    assert loss.abs() > 1e-3 and max(g.abs().max() for g in grads) > 1e-4  # a real loss, a real gradient
    assert parts_loss.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-5)  # float32 sums of terms near 5
    assert max((a - b).abs().max().item() for a, b in zip(parts_grads, grads)) < 1e-6


def test_an_average_of_microbatch_means_would_not_be_the_steps_loss(make_model, tokenizer, forget_pairs):
    # Why the counts travel with the microbatches: answers of different lengths weigh by their tokens.
    method = get_method("GradAscent")
    model = make_model(1)
    batch = collate(tokenizer, forget_pairs[:4])
    step = method.loss(model, None, batch, None, method.Params()).item()
    halves = [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 1), slice(1, 4))]
    mean_of_means = sum(method.loss(model, None, half, None, method.Params()).item() for half in halves) / 2
    assert abs(mean_of_means - step) > 1e-4


def test_split_rows_slices_every_tensor_and_carries_the_steps_counts(tokenizer, forget_pairs):
    dpo = get_method("DPO")
    batch = dpo.collate_forget(tokenizer, forget_pairs[:5], dpo.Params(), generator=torch.Generator().manual_seed(0))
    counts = step_counts(batch)
    assert counts[SEQUENCES].item() == 5
    assert counts[ANSWER_TOKENS].item() == (batch["labels"][:, 1:] != -100).sum().item()
    assert counts[TOKENS].item() == batch["attention_mask"].sum().item()
    parts = split_rows(batch, 2)
    assert [p["input_ids"].size(0) for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p["idk_input_ids"] for p in parts]), batch["idk_input_ids"])
    assert torch.equal(torch.cat([p["idk_index"] for p in parts]), batch["idk_index"])
    assert all(p[key].item() == counts[key].item() for p in parts for key in counts)


def test_a_slot_without_rows_is_a_stand_in_with_infinite_counts(tokenizer, forget_pairs):
    batch = collate(tokenizer, forget_pairs[:2])
    parts = split_rows(batch, 4)
    assert [p["input_ids"].size(0) for p in parts] == [1, 1, 1, 1]
    assert all(math.isinf(p[key].item()) for p in parts[2:] for key in (ANSWER_TOKENS, SEQUENCES, TOKENS))
    assert torch.equal(parts[3]["input_ids"], batch["input_ids"][:1])


def test_each_process_gets_its_own_contiguous_slots(tokenizer, forget_pairs):
    batch = collate(tokenizer, forget_pairs)  # 6 rows, 2 processes × 3 passes: one row each
    rows = [[p["input_ids"] for p in microbatches(batch, rank, 2, 3)] for rank in (0, 1)]
    assert torch.equal(torch.cat(rows[0] + rows[1]), batch["input_ids"])
    assert microbatches(batch, 0, 1, 1) == [batch]  # one process, one pass: the batch untouched, no counts
    assert microbatches(None, 1, 2, 3) == [None, None, None]


def test_a_batch_tensor_without_a_row_per_item_is_refused(tokenizer, forget_pairs):
    batch = {**collate(tokenizer, forget_pairs[:3]), "scale": torch.tensor(2.0)}
    with pytest.raises(ValueError, match="scale"):
        split_rows(batch, 2)
