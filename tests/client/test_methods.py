"""Inner unlearning methods: registry, parameters, and each loss against a by-hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from pum.client.methods import (
    available_methods,
    frozen_reference,
    get_method,
    parse_params,
    register,
)
from pum.client.methods.grad_ascent import gradient_ascent_loss
from pum.client.methods.npo import npo_forget_loss
from pum.common.qa import IGNORE_INDEX, collate, sequence_nll

torch.set_num_threads(1)


# --- independent, straightforward computations -------------------------------------------------


def loop_nlls(logits: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    """Per sequence, the answer-token NLLs, by a loop over positions (token t predicted at t − 1)."""
    out = []
    for b in range(labels.size(0)):
        row = []
        for t in range(1, labels.size(1)):
            target = int(labels[b, t])
            if target != IGNORE_INDEX:
                row.append(-float(torch.log_softmax(logits[b, t - 1].double(), dim=-1)[target]))
        out.append(row)
    return out


def loop_ce(logits, labels) -> float:
    nlls = [x for row in loop_nlls(logits, labels) for x in row]
    return sum(nlls) / len(nlls)


def loop_kl(ref_logits, logits, labels) -> float:
    """KL(reference ‖ model) summed over the vocabulary, averaged over answer positions."""
    values = []
    for b in range(labels.size(0)):
        for t in range(1, labels.size(1)):
            if int(labels[b, t]) != IGNORE_INDEX:
                log_q = torch.log_softmax(ref_logits[b, t - 1].double(), dim=-1)
                log_p = torch.log_softmax(logits[b, t - 1].double(), dim=-1)
                values.append(float((log_q.exp() * (log_q - log_p)).sum()))
    return sum(values) / len(values)


def npo_by_hand(log_p_theta: list[float], log_p_ref: list[float], beta: float) -> float:
    terms = [math.log(1 + math.exp(lt - lr) ** beta) for lt, lr in zip(log_p_theta, log_p_ref)]
    return 2 / beta * sum(terms) / len(terms)


@torch.no_grad()
def logits_of(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture
def batches(tokenizer, forget_pairs, retain_pairs):
    return collate(tokenizer, forget_pairs[:4]), collate(tokenizer, retain_pairs[:5])


# --- registry and parameters --------------------------------------------------------------------


def test_registry_lists_the_methods_and_looks_up_case_insensitively():
    assert {"GradAscent", "GradDiff", "NPO"} <= set(available_methods())
    assert get_method("npo").name == "NPO"
    assert get_method("GradDiff") is get_method("graddiff")


def test_unknown_method_error_lists_the_known_names():
    with pytest.raises(ValueError) as err:
        get_method("SimNPOO")
    for name in available_methods():
        assert name in str(err.value)


def test_register_refuses_a_second_method_with_the_same_name():
    class Impostor(type(get_method("NPO"))):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register(Impostor)


def test_params_have_the_documented_defaults():
    assert parse_params(get_method("NPO"), {}) == get_method("NPO").Params(beta=0.1, gamma=1.0, alpha=1.0)
    diff = parse_params(get_method("GradDiff"), None)
    assert (diff.gamma, diff.alpha, diff.retain_loss) == (1.0, 1.0, "nll")


def test_parse_params_builds_the_frozen_dataclass_and_coerces_numbers():
    params = parse_params(get_method("NPO"), {"beta": 1, "alpha": 0})
    assert params.beta == 1.0 and isinstance(params.beta, float) and params.alpha == 0.0
    with pytest.raises(AttributeError):
        params.beta = 2.0  # frozen


def test_unknown_param_is_refused_naming_it_and_listing_the_allowed_keys():
    with pytest.raises(ValueError) as err:
        parse_params(get_method("NPO"), {"betta": 0.2})
    message = str(err.value)
    assert "betta" in message and all(key in message for key in ("beta", "gamma", "alpha", "retain_loss"))
    with pytest.raises(ValueError, match="allowed: \\(none\\)"):
        parse_params(get_method("GradAscent"), {"beta": 0.1})


@pytest.mark.parametrize(
    "method, mapping, fragment",
    [("NPO", {"beta": 0}, "beta must be > 0"), ("GradDiff", {"retain_loss": "mse"}, "retain_loss"),
     ("NPO", {"beta": "0.1"}, "must be a number")],
)
def test_bad_param_values_are_refused(method, mapping, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_params(get_method(method), mapping)


def test_what_each_method_needs():
    npo, diff, ascent = get_method("NPO"), get_method("GradDiff"), get_method("GradAscent")
    assert npo.uses_reference(parse_params(npo, {})) and npo.uses_retain(parse_params(npo, {}))
    assert not npo.uses_retain(parse_params(npo, {"alpha": 0}))
    assert not diff.uses_reference(parse_params(diff, {})) and diff.uses_retain(parse_params(diff, {}))
    assert diff.uses_reference(parse_params(diff, {"retain_loss": "kl"}))
    assert not ascent.uses_reference(ascent.Params()) and not ascent.uses_retain(ascent.Params())


def test_frozen_reference_is_a_detached_eval_copy(model):
    reference = frozen_reference(model)
    assert reference is not model and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr()


# --- the losses against the by-hand computation -------------------------------------------------


def test_grad_ascent_loss_is_minus_the_mean_answer_token_nll(model, batches):
    forget, _ = batches
    method = get_method("GradAscent")
    loss = method.loss(model, None, forget, None, method.Params())
    expected = -loop_ce(logits_of(model, forget), forget["labels"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert gradient_ascent_loss(logits_of(model, forget), forget["labels"]).item() == pytest.approx(expected, rel=1e-5)


def test_grad_ascent_ce_weights_tokens_not_sequences():
    # two sequences, 1 and 3 answer tokens; uniform logits over 4 symbols except one confident token
    logits = torch.zeros(2, 4, 4)
    logits[0, 0, 2] = math.log(3.0)  # P(2) = 3/6 = 1/2 at the single answer token of row 0
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 1, 3, 0]])
    expected = -(math.log(2) + 3 * math.log(4)) / 4
    assert gradient_ascent_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
def test_grad_diff_loss_matches_the_formula(make_model, batches, retain_loss):
    forget, retain = batches
    model, reference = make_model(0), frozen_reference(make_model(1))
    method = get_method("GradDiff")
    params = parse_params(method, {"gamma": 0.5, "alpha": 2.0, "retain_loss": retain_loss})
    loss = method.loss(model, reference, forget, retain, params)
    forget_ce = loop_ce(logits_of(model, forget), forget["labels"])
    if retain_loss == "nll":
        retain_value = loop_ce(logits_of(model, retain), retain["labels"])
    else:
        retain_value = loop_kl(logits_of(reference, retain), logits_of(model, retain), retain["labels"])
        assert retain_value > 0
    assert loss.item() == pytest.approx(0.5 * -forget_ce + 2.0 * retain_value, rel=1e-5)


def test_grad_diff_zero_alpha(model, batches):
    forget, _ = batches
    method = get_method("GradDiff")
    loss = method.loss(model, None, forget, None, parse_params(method, {"alpha": 0}))
    assert loss.item() == pytest.approx(-loop_ce(logits_of(model, forget), forget["labels"]), rel=1e-5)


def test_npo_forget_loss_known_values():
    # β = 1, equal log-probs: 2·log 2; β = 0.5, log π_θ − log π_ref = 2·ln 3: (2/0.5)·log(1 + 3) = 4·log 4
    assert npo_forget_loss(torch.tensor([-4.0]), torch.tensor([-4.0]), 1.0).item() == pytest.approx(1.3862943611)
    gap = 2 * math.log(3)
    value = npo_forget_loss(torch.tensor([-1.0]), torch.tensor([-1.0 - gap]), 0.5).item()
    assert value == pytest.approx(5.5451774445, rel=1e-6)
    pair = npo_forget_loss(torch.tensor([-4.0, -1.0]), torch.tensor([-4.0, -1.0 - gap]), 0.5).item()
    assert pair == pytest.approx((4 * math.log(2) + 4 * math.log(4)) / 2, rel=1e-6)


def test_npo_forget_loss_matches_the_formula_and_is_stable():
    log_p_theta, log_p_ref = [-12.5, -3.25, -40.0], [-10.0, -7.5, -39.0]
    for beta in (0.1, 1.0, 2.5):
        got = npo_forget_loss(torch.tensor(log_p_theta, dtype=torch.float64), torch.tensor(log_p_ref, dtype=torch.float64), beta)
        assert got.item() == pytest.approx(npo_by_hand(log_p_theta, log_p_ref, beta), rel=1e-9)
    # ratios far beyond float range: softplus stays finite where (π_θ/π_ref)^β would overflow
    huge = npo_forget_loss(torch.tensor([0.0]), torch.tensor([-5000.0]), 1.0)
    assert torch.isfinite(huge) and huge.item() == pytest.approx(2 * 5000.0, rel=1e-6)


def test_npo_loss_matches_the_formula_on_a_model(make_model, batches):
    forget, retain = batches
    model, reference = make_model(0), frozen_reference(make_model(1))
    method = get_method("NPO")
    params = parse_params(method, {"beta": 0.5, "gamma": 1.0, "alpha": 0.25})
    loss = method.loss(model, reference, forget, retain, params)
    log_p_theta = [-sum(row) for row in loop_nlls(logits_of(model, forget), forget["labels"])]
    log_p_ref = [-sum(row) for row in loop_nlls(logits_of(reference, forget), forget["labels"])]
    expected = npo_by_hand(log_p_theta, log_p_ref, 0.5) + 0.25 * loop_ce(logits_of(model, retain), retain["labels"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_forget_term_with_model_equal_to_reference_is_2_log_2_over_beta(model, batches, beta):
    forget, _ = batches
    method = get_method("NPO")
    loss = method.loss(model, frozen_reference(model), forget, None, parse_params(method, {"beta": beta, "alpha": 0}))
    assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_gradient_at_the_reference_is_the_ascent_direction_on_sequence_nll(model, batches):
    # d/dθ (2/β)·softplus(β·(log π_θ − log π_ref)) at π_θ = π_ref is mean_i ∇ log π_θ(y_i|x_i) for any β
    forget, _ = batches
    method = get_method("NPO")
    method.loss(model, frozen_reference(model), forget, None, parse_params(method, {"beta": 0.3, "alpha": 0})).backward()
    npo_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    (-sequence_nll(logits, forget["labels"])[0]).mean().backward()
    assert torch.allclose(npo_grad, model.lm_head.weight.grad, atol=1e-6)
