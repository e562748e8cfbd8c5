"""The added inner methods' losses (SimNPO, DPO, RMU, UNDIAL, WGA, SatImp, CE-U) against by-hand computations.

Every expected value is computed independently of the implementation: loops over positions with
`log_softmax` on one vector at a time (float64), and `math` for the sequence-level formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pum.client.methods import available_methods, frozen_reference, get_method, parse_params
from pum.client.methods.ceu import ceu_loss
from pum.client.methods.dpo import dpo_forget_loss
from pum.client.methods.rmu import layer_index, masked_mse, random_unit_vector, rmu_forget_loss
from pum.client.methods.satimp import satimp_loss
from pum.client.methods.simnpo import simnpo_forget_loss
from pum.client.methods.undial import undial_loss
from pum.client.methods.wga import wga_loss
from pum.common.qa import IGNORE_INDEX, collate

torch.set_num_threads(1)

NEW_METHODS = ["SimNPO", "DPO", "RMU", "UNDIAL", "WGA", "SatImp", "CE-U"]


# --- independent, straightforward computations -------------------------------------------------


def answer_positions(labels: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, position of the predicting logits, target token) for every answer token, by a loop."""
    out = []
    for b in range(labels.size(0)):
        for t in range(1, labels.size(1)):
            if int(labels[b, t]) != IGNORE_INDEX:
                out.append((b, t - 1, int(labels[b, t])))
    return out


def log_probs_at(logits: torch.Tensor, b: int, t: int) -> torch.Tensor:
    return torch.log_softmax(logits[b, t].double(), dim=-1)


def loop_sequence_nll(logits, labels) -> tuple[list[float], list[int]]:
    nll = [0.0] * labels.size(0)
    count = [0] * labels.size(0)
    for b, t, y in answer_positions(labels):
        nll[b] -= float(log_probs_at(logits, b, t)[y])
        count[b] += 1
    return nll, count


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@torch.no_grad()
def logits_of(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture
def batches(tokenizer, forget_pairs, retain_pairs):
    return collate(tokenizer, forget_pairs[:4]), collate(tokenizer, retain_pairs[:5])


@pytest.fixture
def tiny():
    """Random logits over a 7-token vocabulary and labels with 1, 3 and 0 answer tokens."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64) * 2
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 2] = 4
    labels[1, 2:5] = torch.tensor([0, 6, 2])
    return logits, labels


# --- registry and parameters --------------------------------------------------------------------


def test_registry_lists_every_method_once_and_resolves_aliases():
    assert set(available_methods()) == {"GradAscent", "GradDiff", "NPO", *NEW_METHODS}
    assert len(available_methods()) == len(set(available_methods()))
    assert get_method("IdkDPO") is get_method("DPO") is get_method("idkdpo")
    assert get_method("CEU") is get_method("ce-u")
    assert get_method("simnpo").name == "SimNPO" and get_method("undial").name == "UNDIAL"


def test_unknown_method_error_lists_names_and_aliases():
    with pytest.raises(ValueError) as err:
        get_method("IdkDPOO")
    assert all(name in str(err.value) for name in available_methods()) and "IdkDPO" in str(err.value)


def test_defaults():
    defaults = {name: parse_params(get_method(name), {}) for name in NEW_METHODS}
    s = defaults["SimNPO"]
    assert (s.beta, s.delta, s.gamma, s.alpha, s.retain_loss) == (4.5, 0.0, 0.125, 1.0, "nll")
    d = defaults["DPO"]
    assert (d.beta, d.gamma, d.alpha, d.retain_loss) == (0.1, 1.0, 1.0, "nll")
    r = defaults["RMU"]
    assert (r.steering_coeff, r.gamma, r.alpha, r.layer, r.u_seed) == (2.0, 1.0, 1.0, None, 0)
    u = defaults["UNDIAL"]
    assert (u.beta, u.gamma, u.alpha) == (10.0, 1.0, 0.0)
    w = defaults["WGA"]
    assert (w.beta, w.gamma, w.alpha) == (1.0, 1.0, 1.0)
    i = defaults["SatImp"]
    assert (i.beta1, i.beta2, i.gamma, i.alpha) == (5.0, 1.0, 0.1, 1.0)
    c = defaults["CE-U"]
    assert (c.gamma, c.alpha) == (1.0, 0.0)
    for name, params in defaults.items():
        with pytest.raises(AttributeError):
            params.gamma = 2.0  # frozen


def test_what_each_method_needs_by_default_and_per_configuration():
    expected = {  # name: (needs_reference, needs_retain) at the defaults
        "SimNPO": (False, True), "DPO": (True, True), "RMU": (True, True), "UNDIAL": (True, False),
        "WGA": (False, True), "SatImp": (False, True), "CE-U": (False, False),
    }
    for name, (reference, retain) in expected.items():
        method = get_method(name)
        params = parse_params(method, {})
        assert (method.needs_reference, method.needs_retain) == (reference, retain), name
        assert (method.uses_reference(params), method.uses_retain(params)) == (reference, retain), name
    rmu = get_method("RMU")
    assert not rmu.uses_reference(parse_params(rmu, {"alpha": 0})) and not rmu.uses_retain(parse_params(rmu, {"alpha": 0}))
    for name in ("SimNPO", "WGA", "SatImp", "CE-U"):
        params = parse_params(get_method(name), {"alpha": 1, "retain_loss": "kl"})
        assert get_method(name).uses_reference(params) and get_method(name).uses_retain(params), name
    assert get_method("UNDIAL").uses_retain(parse_params(get_method("UNDIAL"), {"alpha": 0.5}))
    assert not get_method("DPO").uses_retain(parse_params(get_method("DPO"), {"alpha": 0}))


@pytest.mark.parametrize(
    "method, mapping, fragment",
    [
        ("SimNPO", {"beta": 0}, "beta must be > 0"),
        ("DPO", {"beta": -1}, "beta must be > 0"),
        ("DPO", {"retain_loss": "mse"}, "retain_loss"),
        ("RMU", {"steering_coeff": 0}, "steering_coeff"),
        ("RMU", {"layer": 0}, "layer"),
        ("RMU", {"layer": 1.0}, "layer"),
        ("RMU", {"layer": True}, "layer"),
        ("RMU", {"u_seed": "1"}, "u_seed"),
        ("UNDIAL", {"beta": -0.5}, "beta"),
        ("WGA", {"beta": -1}, "beta"),
        ("SatImp", {"beta2": -1}, "beta2"),
        ("CE-U", {"beta": 1.0}, "allowed: gamma, alpha, retain_loss"),
    ],
)
def test_bad_params_are_refused(method, mapping, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_params(get_method(method), mapping)


# --- SimNPO -------------------------------------------------------------------------------------


def simnpo_by_hand(nll: list[float], lengths: list[int], beta: float, delta: float) -> float:
    terms = [-(2 / beta) * log_sigmoid(beta * n / max(1, k) - delta) for n, k in zip(nll, lengths)]
    return sum(terms) / len(terms)


def test_simnpo_known_value_and_formula():
    # one answer of 2 tokens with NLL 4 (2 per token), β = 1, δ = 0: −2·log σ(2) = 2·log(1 + e^−2)
    value = simnpo_forget_loss(torch.tensor([4.0], dtype=torch.float64), torch.tensor([2]), 1.0)
    assert value.item() == pytest.approx(2 * math.log1p(math.exp(-2)), rel=1e-12)
    nll, lengths = [12.5, 3.25, 40.0, 0.0], [5, 1, 16, 0]
    for beta, delta in ((4.5, 0.0), (0.5, 1.5), (2.0, -0.25)):
        got = simnpo_forget_loss(torch.tensor(nll, dtype=torch.float64), torch.tensor(lengths), beta, delta)
        assert got.item() == pytest.approx(simnpo_by_hand(nll, lengths, beta, delta), rel=1e-6)


def test_simnpo_margin_is_the_papers_not_scaled_by_beta():
    # paper: σ(β·NLL/|y| − δ); DESIGN's σ(β·(NLL/|y| − d)) is the same loss with δ = β·d
    nll, lengths, beta, d = torch.tensor([6.0, 1.0]), torch.tensor([3, 2]), 2.5, 0.4
    design = (-(2 / beta) * torch.nn.functional.logsigmoid(beta * (nll / lengths - d))).mean()
    assert simnpo_forget_loss(nll, lengths, beta, delta=beta * d).item() == pytest.approx(design.item(), rel=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    st.floats(0.0, 50.0), st.floats(0.01, 50.0), st.integers(1, 30), st.floats(0.05, 10.0), st.floats(-2.0, 2.0)
)
def test_simnpo_forget_loss_falls_as_the_nll_rises(nll, more, length, beta, delta):
    # minimising it pushes NLL up: a larger NLL never has a larger loss
    low = simnpo_forget_loss(torch.tensor([nll], dtype=torch.float64), torch.tensor([length]), beta, delta)
    high = simnpo_forget_loss(torch.tensor([nll + more], dtype=torch.float64), torch.tensor([length]), beta, delta)
    assert high.item() <= low.item() and torch.isfinite(high)


def test_simnpo_loss_on_a_model_matches_the_formula(model, batches):
    forget, retain = batches
    method = get_method("SimNPO")
    params = parse_params(method, {"beta": 2.0, "delta": 0.5, "gamma": 0.25, "alpha": 0.75})
    loss = method.loss(model, None, forget, retain, params)
    nll, lengths = loop_sequence_nll(logits_of(model, forget), forget["labels"])
    retain_nll, retain_lengths = loop_sequence_nll(logits_of(model, retain), retain["labels"])
    expected = 0.25 * simnpo_by_hand(nll, lengths, 2.0, 0.5) + 0.75 * sum(retain_nll) / sum(retain_lengths)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --- DPO ----------------------------------------------------------------------------------------


def test_dpo_forget_loss_known_values_and_formula():
    # equal log-ratios: (2/β)·log 2 for any β
    zero = dpo_forget_loss(*(torch.tensor([-3.0]),) * 4, beta=0.1)
    assert zero.item() == pytest.approx(20 * math.log(2), rel=1e-6)
    lt_i, lr_i, lt_f, lr_f = [-5.0, -20.0], [-9.0, -18.0], [-30.0, -2.0], [-10.0, -2.5]
    for beta in (0.1, 1.0, 3.0):
        margins = [(a - b) - (c - d) for a, b, c, d in zip(lt_i, lr_i, lt_f, lr_f)]
        expected = sum(-(2 / beta) * log_sigmoid(beta * m) for m in margins) / 2
        got = dpo_forget_loss(*(torch.tensor(v, dtype=torch.float64) for v in (lt_i, lr_i, lt_f, lr_f)), beta=beta)
        assert got.item() == pytest.approx(expected, rel=1e-6)
    huge = dpo_forget_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([-4000.0]), 1.0)
    assert torch.isfinite(huge) and huge.item() == pytest.approx(8000.0, rel=1e-6)


# --- RMU ----------------------------------------------------------------------------------------


def test_random_unit_vector_is_seeded_nonnegative_and_unit():
    u = random_unit_vector(64, seed=5)
    assert u.shape == (64,) and float(u.norm()) == pytest.approx(1.0, abs=1e-6) and bool((u >= 0).all())
    assert torch.equal(u, random_unit_vector(64, seed=5)) and not torch.equal(u, random_unit_vector(64, seed=6))


def test_layer_index_is_the_middle_block_by_default():
    assert [layer_index(n, None) for n in (1, 2, 3, 32)] == [1, 1, 1, 16]
    assert layer_index(4, 3) == 3
    with pytest.raises(ValueError, match=r"1\.\.2"):
        layer_index(2, 3)


def test_masked_mse_counts_only_the_masked_tokens():
    hidden = torch.tensor([[[1.0, 2.0], [5.0, 5.0]], [[0.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 0], [1, 0]])
    # tokens (0,0) and (1,0) against target (1, 1): (0 + 1 + 1 + 1) / (2 tokens · 2 dims)
    assert masked_mse(hidden, torch.tensor([1.0, 1.0]), mask).item() == pytest.approx(0.75)


def rmu_mse_by_hand(hidden, target_of, mask) -> float:
    total, count = 0.0, 0
    for b in range(hidden.size(0)):
        for t in range(hidden.size(1)):
            if int(mask[b, t]):
                diff = hidden[b, t].double() - target_of(b, t).double()
                total += float((diff * diff).sum())
                count += 1
    return total / (count * hidden.size(-1))


def test_rmu_loss_on_a_model_matches_the_formula(make_model, batches):
    forget, retain = batches
    model, reference = make_model(0), frozen_reference(make_model(1))
    method = get_method("RMU")
    params = parse_params(method, {"steering_coeff": 3.0, "alpha": 0.5, "gamma": 2.0, "u_seed": 7})
    loss = method.loss(model, reference, forget, retain, params)
    with torch.no_grad():
        def states(m, batch):  # hidden_states[1]: the output of the first of the 2 blocks
            return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[1]

        h_f, h_r, h_ref = states(model, forget), states(model, retain), states(reference, retain)
    u = random_unit_vector(h_f.size(-1), 7)
    forget_mse = rmu_mse_by_hand(h_f, lambda b, t: 3.0 * u, forget["attention_mask"])
    retain_mse = rmu_mse_by_hand(h_r, lambda b, t: h_ref[b, t], retain["attention_mask"])
    assert retain_mse > 0
    assert loss.item() == pytest.approx(2.0 * forget_mse + 0.5 * retain_mse, rel=1e-5)
    assert rmu_forget_loss(h_f, forget["attention_mask"], u, 3.0).item() == pytest.approx(forget_mse, rel=1e-5)


def test_rmu_reads_the_chosen_layer(model, batches):
    forget, _ = batches
    method = get_method("RMU")
    at = {layer: method.loss(model, None, forget, None, parse_params(method, {"alpha": 0, "layer": layer})).item() for layer in (1, 2)}
    assert at[1] != at[2]
    default = method.loss(model, None, forget, None, parse_params(method, {"alpha": 0})).item()
    assert default == at[1]
    with pytest.raises(ValueError, match="layer"):
        method.loss(model, None, forget, None, parse_params(method, {"alpha": 0, "layer": 3}))


# --- UNDIAL -------------------------------------------------------------------------------------


def undial_by_hand(logits, ref_logits, labels, beta) -> float:
    values = []
    for b, t, y in answer_positions(labels):
        z_ref = ref_logits[b, t].double()
        weights = [math.exp(float(z_ref[v]) - (beta if v == y else 0.0)) for v in range(z_ref.numel())]
        total = sum(weights)
        log_p = log_probs_at(logits, b, t)
        values.append(-sum(w / total * float(log_p[v]) for v, w in enumerate(weights)))
    return sum(values) / len(values)


def test_undial_loss_matches_the_formula(tiny):
    logits, labels = tiny
    ref_logits = logits.flip(-1) * 0.5
    for beta in (0.0, 1.0, 10.0):
        got = undial_loss(logits, ref_logits, labels, beta).item()
        assert got == pytest.approx(undial_by_hand(logits, ref_logits, labels, beta), rel=1e-6)


def test_undial_with_beta_zero_at_the_reference_is_the_entropy(tiny):
    logits, labels = tiny
    entropies = []
    for b, t, _ in answer_positions(labels):
        log_p = log_probs_at(logits, b, t)
        entropies.append(-float((log_p.exp() * log_p).sum()))
    assert undial_loss(logits, logits, labels, 0.0).item() == pytest.approx(sum(entropies) / len(entropies), rel=1e-6)


def test_undial_loss_on_a_model(make_model, batches):
    forget, retain = batches
    model, reference = make_model(0), frozen_reference(make_model(1))
    method = get_method("UNDIAL")
    loss = method.loss(model, reference, forget, None, parse_params(method, {}))
    expected = undial_by_hand(logits_of(model, forget), logits_of(reference, forget), forget["labels"], 10.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with_retain = method.loss(model, reference, forget, retain, parse_params(method, {"alpha": 2.0}))
    retain_nll, retain_lengths = loop_sequence_nll(logits_of(model, retain), retain["labels"])
    assert with_retain.item() == pytest.approx(expected + 2.0 * sum(retain_nll) / sum(retain_lengths), rel=1e-5)


# --- WGA and SatImp -----------------------------------------------------------------------------


def weighted_ascent_by_hand(logits, labels, weight_of) -> float:
    values = []
    for b, t, y in answer_positions(labels):
        log_p = float(log_probs_at(logits, b, t)[y])
        values.append(weight_of(math.exp(log_p)) * log_p)  # −w·NLL = w·log p
    return sum(values) / len(values)


def test_wga_loss_matches_the_formula(tiny):
    logits, labels = tiny
    for beta in (0.0, 1.0, 2.5):
        expected = weighted_ascent_by_hand(logits, labels, lambda p: p**beta)
        assert wga_loss(logits, labels, beta).item() == pytest.approx(expected, rel=1e-6)


def test_wga_with_beta_zero_is_gradient_ascent(model, batches):
    forget, _ = batches
    logits = logits_of(model, forget)
    nll, lengths = loop_sequence_nll(logits, forget["labels"])
    assert wga_loss(logits, forget["labels"], 0.0).item() == pytest.approx(-sum(nll) / sum(lengths), rel=1e-5)


def test_satimp_loss_matches_the_formula(tiny):
    logits, labels = tiny
    for beta1, beta2 in ((5.0, 1.0), (1.0, 0.0), (0.5, 2.0)):
        expected = weighted_ascent_by_hand(logits, labels, lambda p: p**beta1 * (1 - p) ** beta2)
        assert satimp_loss(logits, labels, beta1, beta2).item() == pytest.approx(expected, rel=1e-6)


def test_token_weights_are_detached():
    # one answer token over 3 symbols: d/dz of −w·NLL with w held fixed is −w·(softmax(z) − onehot(y))
    logits = torch.tensor([[[0.3, -1.0, 2.0], [0.0, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 1]])
    p = torch.softmax(logits.detach()[0, 0], dim=-1)
    onehot = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    for loss_fn, weight in (
        (lambda z: wga_loss(z, labels, 2.0), float(p[1]) ** 2),
        (lambda z: satimp_loss(z, labels, 5.0, 1.0), float(p[1]) ** 5 * (1 - float(p[1]))),
    ):
        (grad,) = torch.autograd.grad(loss_fn(logits), logits)
        assert torch.allclose(grad[0, 0], -weight * (p - onehot), atol=1e-7)


def test_wga_and_satimp_with_retain_on_a_model(model, batches):
    forget, retain = batches
    logits, retain_logits = logits_of(model, forget), logits_of(model, retain)
    retain_nll, retain_lengths = loop_sequence_nll(retain_logits, retain["labels"])
    retain_ce = sum(retain_nll) / sum(retain_lengths)
    wga = get_method("WGA")
    got = wga.loss(model, None, forget, retain, parse_params(wga, {"gamma": 0.5, "alpha": 2.0})).item()
    assert got == pytest.approx(0.5 * weighted_ascent_by_hand(logits, forget["labels"], lambda p: p) + 2.0 * retain_ce, rel=1e-5)
    satimp = get_method("SatImp")
    got = satimp.loss(model, None, forget, retain, parse_params(satimp, {})).item()
    by_hand = weighted_ascent_by_hand(logits, forget["labels"], lambda p: p**5 * (1 - p))
    assert got == pytest.approx(0.1 * by_hand + retain_ce, rel=1e-5)


# --- CE-U ---------------------------------------------------------------------------------------


def ceu_by_hand(logits, labels) -> float:
    values = []
    for b, t, y in answer_positions(labels):
        log_p = log_probs_at(logits, b, t)
        p = log_p.exp()
        rest = 1 - float(p[y])  # q(v) = p(v) / (1 − p(y)) for v ≠ y, q(y) = 0
        values.append(-sum(float(p[v]) / rest * float(log_p[v]) for v in range(p.numel()) if v != y))
    return sum(values) / len(values)


def test_ceu_loss_matches_the_formula(tiny, model, batches):
    logits, labels = tiny
    assert ceu_loss(logits, labels).item() == pytest.approx(ceu_by_hand(logits, labels), rel=1e-6)
    forget, _ = batches
    method = get_method("CE-U")
    got = method.loss(model, None, forget, None, parse_params(method, {})).item()
    assert got == pytest.approx(ceu_by_hand(logits_of(model, forget), forget["labels"]), rel=1e-5)


def test_ceu_gradient_is_p_minus_the_target_with_the_answer_removed():
    logits = torch.tensor([[[0.3, -1.0, 2.0, 0.5], [0.0] * 4]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 2]])
    (grad,) = torch.autograd.grad(ceu_loss(logits, labels), logits)
    p = torch.softmax(logits.detach()[0, 0], dim=-1)
    q = p.clone()
    q[2] = 0
    q = q / q.sum()
    assert torch.allclose(grad[0, 0], p - q, atol=1e-7)
    assert grad[0, 0, 2] > 0  # descent lowers the answer token's logit
