"""Teacher-forced scores, greedy answers and ROUGE-L recall: a fake successor model whose numbers are
known by hand, then the tiny fine-tuned model for batching and padding."""

import math
from types import SimpleNamespace

import pytest
import torch

from pum.common.qa import QAPair, answer_probabilities
from pum.evaluation import metrics
from pum.evaluation.scoring import generate_answers, rouge_l_recall, score_answers

VOCAB, LIFT = 128, 3.0


class CharTokenizer:
    """One token per ASCII character, no special tokens (so no EOS is appended to answers)."""

    eos_token_id = None
    bos_token_id = None
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


class SuccessorLM(torch.nn.Module):
    """Logit LIFT on token (x + 1) after token x, 0 elsewhere: the argmax always predicts the successor."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids, attention_mask=None):
        nxt = (input_ids + 1) % VOCAB
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, VOCAB).float() * LIFT)


LOG_Z = math.log(math.exp(LIFT) + VOCAB - 1)
HIT, MISS = LIFT - LOG_Z, -LOG_Z  # log p of the predicted successor, of any other token


def test_fake_scorer_by_hand():
    tok, model = CharTokenizer(), SuccessorLM()
    # prompt "...Answer:" then " abcd": ':'→' ' miss, ' '→'a' miss, 'a'→'b', 'b'→'c', 'c'→'d' hits
    # and " xbcd": 'x'→'b' misses too
    abcd, xbcd = score_answers(model, tok, [QAPair("q", "abcd"), QAPair("q", "xbcd")], batch_size=2)
    assert abcd.argmax_match == (False, False, True, True, True)
    assert xbcd.argmax_match == (False, False, False, True, True)
    assert metrics.extraction_strength(abcd.argmax_match) == pytest.approx(1 - 2 / 5)
    assert metrics.extraction_strength(xbcd.argmax_match) == pytest.approx(1 - 3 / 5)
    assert abcd.logprobs == pytest.approx([MISS, MISS, HIT, HIT, HIT], rel=1e-5)  # float32
    assert abcd.avg_nll == pytest.approx(-(2 * MISS + 3 * HIT) / 5, rel=1e-5)
    assert metrics.mia_min_k(abcd.logprobs) == pytest.approx(-MISS, rel=1e-5)  # the 2 lowest of 5: both misses
    # μ and σ of log p under the model's own distribution: one token at HIT, 127 at MISS
    p_hit, p_miss = math.exp(HIT), math.exp(MISS)
    mu = p_hit * HIT + (VOCAB - 1) * p_miss * MISS
    sigma = math.sqrt(p_hit * HIT**2 + (VOCAB - 1) * p_miss * MISS**2 - mu**2)
    assert abcd.mu == pytest.approx([mu] * 5, rel=1e-5) and abcd.sigma == pytest.approx([sigma] * 5, rel=1e-5)
    assert metrics.mia_min_k_plus_plus(abcd.logprobs, abcd.mu, abcd.sigma) == pytest.approx(-(MISS - mu) / sigma, rel=1e-5)


def test_scores_agree_with_common_qa_and_do_not_depend_on_batching(assets, loaded):
    model, tok = loaded
    pairs = assets.pairs("forget10") + assets.pairs("holdout10")[:3]
    one = score_answers(model, tok, pairs, batch_size=1)
    many = score_answers(model, tok, pairs, batch_size=4)
    assert [s.prob for s in many] == pytest.approx(answer_probabilities(model, tok, pairs), rel=1e-5)
    for a, b in zip(one, many):
        assert a.argmax_match == b.argmax_match
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.mu == pytest.approx(b.mu, abs=1e-4) and a.sigma == pytest.approx(b.sigma, abs=1e-4)


def test_batched_left_padded_generation_equals_one_by_one(assets, loaded):
    model, tok = loaded
    questions = [p.question for p in assets.pairs("forget10")][:4] + ["Who?"]  # different prompt lengths
    batched = generate_answers(model, tok, questions, batch_size=5, max_new_tokens=24)
    single = [generate_answers(model, tok, [q], batch_size=1, max_new_tokens=24)[0] for q in questions]
    assert batched == single
    assert all("</s>" not in answer and "<pad>" not in answer for answer in batched)
    # the memorised model answers its training questions (it stopped at EOS, not at the budget)
    forget = assets.pairs("forget10")[:4]
    assert sum(rouge_l_recall(p.answer, a) for p, a in zip(forget, batched)) / 4 > 0.5


def test_rouge_l_recall_by_hand():
    # stemmed: "the cat sat on the mat" vs "the cat were sit on a mat": LCS the·cat·on·mat = 4 of 6 words
    assert rouge_l_recall("the cat sat on the mat", "the cats were sitting on a mat") == pytest.approx(4 / 6)
    assert rouge_l_recall("Paris", "It is Paris, of course.") == 1.0  # recall ignores extra words
    assert rouge_l_recall("Paris", "") == 0.0


def test_bad_batch_sizes_refused(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="batch_size"):
        score_answers(model, tok, [QAPair("q", "a")], batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, tok, ["q"], max_new_tokens=0)
