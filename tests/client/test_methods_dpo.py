"""DPO (IdkDPO): the "I don't know" answers, how they are chosen, and that they are the texts scored."""

from __future__ import annotations

import math

import pytest
import torch

from pum.client.methods import frozen_reference, get_method, load_idk_answers, parse_params
from pum.client.methods.idk import check_idk_answers, choose_idk
from pum.client.trainer import TrainConfig, run_unlearning
from pum.common.qa import IGNORE_INDEX, collate

torch.set_num_threads(1)


def loop_log_p(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per sequence, Σ log p(answer token), by a loop over positions."""
    out = []
    for b in range(labels.size(0)):
        total = 0.0
        for t in range(1, labels.size(1)):
            if int(labels[b, t]) != IGNORE_INDEX:
                total += float(torch.log_softmax(logits[b, t - 1].double(), dim=-1)[int(labels[b, t])])
        out.append(total)
    return out


@torch.no_grad()
def logits_of(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def answer_text(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    return tokenizer.decode([int(i) for i, l in zip(input_ids, labels) if int(l) != IGNORE_INDEX])


# --- the answers --------------------------------------------------------------------------------


def test_the_packaged_list_is_tofus_hundred_lines():
    answers = load_idk_answers()
    assert len(answers) == 100 and len(set(answers)) > 90
    assert answers[0] == "I'm not certain about that." and answers[-1] == "I'm not sure I can help with that."
    assert all(a == a.strip() and a for a in answers)


def test_a_list_loads_from_a_text_file(tmp_path):
    path = tmp_path / "idk.txt"
    path.write_text("No idea.\n\n  Ask someone else.  \n", encoding="utf-8")
    assert load_idk_answers(path) == ("No idea.", "Ask someone else.")
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no answers"):
        load_idk_answers(path)


@pytest.mark.parametrize("bad", ["I don't know", [], ["ok", "  "], ["ok", 3]])
def test_bad_answer_lists_are_refused(bad):
    with pytest.raises(ValueError, match="idk_answers"):
        check_idk_answers(bad)


def test_the_choice_is_seeded():
    first = choose_idk(50, 100, torch.Generator().manual_seed(4))
    assert first == choose_idk(50, 100, torch.Generator().manual_seed(4))
    assert first != choose_idk(50, 100, torch.Generator().manual_seed(5))
    assert all(0 <= i < 100 for i in first) and len(set(first)) > 10
    generator = torch.Generator().manual_seed(4)
    assert choose_idk(6, 100, generator) != choose_idk(6, 100, generator)  # the next batch draws anew
    assert choose_idk(3, 7) == choose_idk(3, 7)  # no generator: seeded 0


# --- the batch ----------------------------------------------------------------------------------


def test_collate_forget_pairs_each_question_with_its_chosen_idk_answer(tokenizer, forget_pairs):
    method = get_method("DPO")
    answers = ["I have no idea.", "That is unknown to me.", "Ask someone else."]
    batch = method.collate_forget(
        tokenizer, forget_pairs, method.Params(), generator=torch.Generator().manual_seed(1), idk_answers=answers
    )
    plain = collate(tokenizer, forget_pairs)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], plain[key])  # the forget batch itself is unchanged
    index = batch["idk_index"].tolist()
    assert index == choose_idk(len(forget_pairs), 3, torch.Generator().manual_seed(1))
    for row, pair in enumerate(forget_pairs):
        idk_ids, idk_labels = batch["idk_input_ids"][row], batch["idk_labels"][row]
        assert answer_text(tokenizer, idk_ids, idk_labels) == f" {answers[index[row]]}<eos>"
        prompt = [int(i) for i, l, m in zip(idk_ids, idk_labels, batch["idk_attention_mask"][row]) if int(l) == IGNORE_INDEX and m]
        assert tokenizer.decode(prompt) == f"Question: {pair.question}\nAnswer:"


def test_collate_forget_defaults_to_the_packaged_list(tokenizer, forget_pairs):
    method = get_method("DPO")
    batch = method.collate_forget(tokenizer, forget_pairs[:3], method.Params())
    packaged = load_idk_answers()
    for row, i in enumerate(batch["idk_index"].tolist()):
        text = answer_text(tokenizer, batch["idk_input_ids"][row], batch["idk_labels"][row])
        assert text == f" {packaged[i]}<eos>"


def test_other_methods_collate_the_plain_batch(tokenizer, forget_pairs):
    method = get_method("NPO")
    batch = method.collate_forget(tokenizer, forget_pairs, method.Params(), idk_answers=["x"])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


# --- the loss -----------------------------------------------------------------------------------


def test_dpo_scores_the_idk_answers(tokenizer, forget_pairs, retain_pairs, make_model):
    model, reference = make_model(0), frozen_reference(make_model(1))
    method = get_method("IdkDPO")
    params = parse_params(method, {"beta": 0.5, "gamma": 1.0, "alpha": 0.5})
    pairs, retain = forget_pairs[:4], collate(tokenizer, retain_pairs[:3])
    batch = method.collate_forget(tokenizer, pairs, params, idk_answers=["I have no idea."])
    loss = method.loss(model, reference, batch, retain, params)

    # by hand: the idk texts built independently, log-probabilities by a loop
    idk = collate(tokenizer, [(p.question, "I have no idea.") for p in pairs])
    forget = collate(tokenizer, pairs)
    lt_i, lr_i = loop_log_p(logits_of(model, idk), idk["labels"]), loop_log_p(logits_of(reference, idk), idk["labels"])
    lt_f, lr_f = loop_log_p(logits_of(model, forget), forget["labels"]), loop_log_p(logits_of(reference, forget), forget["labels"])
    margins = [(a - b) - (c - d) for a, b, c, d in zip(lt_i, lr_i, lt_f, lr_f)]
    forget_term = sum((2 / 0.5) * math.log1p(math.exp(-0.5 * m)) for m in margins) / len(margins)
    retain_lp = loop_log_p(logits_of(model, retain), retain["labels"])
    retain_ce = -sum(retain_lp) / int((retain["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert loss.item() == pytest.approx(forget_term + 0.5 * retain_ce, rel=1e-5)

    other = method.collate_forget(tokenizer, pairs, params, idk_answers=["Ask someone else."])
    assert method.loss(model, reference, other, retain, params).item() != pytest.approx(loss.item(), rel=1e-6)


def test_dpo_at_the_reference_is_2_log_2_over_beta(tokenizer, forget_pairs, model):
    method = get_method("DPO")
    params = parse_params(method, {"alpha": 0})
    batch = method.collate_forget(tokenizer, forget_pairs, params)
    loss = method.loss(model, frozen_reference(model), batch, None, params)
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)


def test_dpo_refuses_a_batch_without_idk_answers(tokenizer, forget_pairs, model):
    method = get_method("DPO")
    with pytest.raises(ValueError, match="idk_input_ids.*collate_forget"):
        method.loss(model, frozen_reference(model), collate(tokenizer, forget_pairs), None, parse_params(method, {"alpha": 0}))


# --- through the trainer ------------------------------------------------------------------------


def test_run_unlearning_passes_the_idk_answers_and_is_deterministic(tokenizer, forget_pairs, retain_pairs, make_model):
    config = TrainConfig(method="IdkDPO", params={"beta": 0.5}, lr=1e-2, optimizer="sgd", batch_size=3, max_steps=2)

    def run(answers):
        model = make_model(0)
        result = run_unlearning(model, tokenizer, forget_pairs, retain_pairs, config, idk_answers=answers)
        return result, torch.cat([p.detach().flatten() for p in model.parameters()])

    first, weights = run(["I have no idea.", "Ask someone else."])
    again, same = run(["I have no idea.", "Ask someone else."])
    _, other = run(["Nobody knows."])
    assert first["method"] == "DPO" and first["steps"] == 2 and math.isfinite(first["last_loss"])
    assert torch.equal(weights, same) and first["last_loss"] == again["last_loss"]
    assert not torch.equal(weights, other)  # the answers given are the ones trained towards
    with pytest.raises(ValueError, match="idk_answers"):
        run_unlearning(make_model(0), tokenizer, forget_pairs, retain_pairs, config, idk_answers=[])
