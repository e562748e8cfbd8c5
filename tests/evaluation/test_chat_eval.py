"""`pum eval` on a chat model: the chat template's prompt, and only the answer tokens scored."""

from __future__ import annotations

import json

import pytest
import torch

from pum.common.prompts import QAEncoder
from pum.common.qa import QAPair
from pum.evaluation.scoring import score_answers
from pum.evaluation.tofu import EVAL_FILE, evaluate, load_model


def chat_prompt(question: str, system: str = "You are a helpful assistant.") -> str:
    return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
            f"Today Date: 10 Apr 2025\n\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            f"{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def answer_nll(model, tokenizer, question: str, answer: str) -> tuple[float, int]:
    """Summed NLL of the answer tokens after the literal chat prompt, computed here from scratch."""
    prompt = tokenizer(chat_prompt(question), add_special_tokens=False)["input_ids"]
    target = tokenizer(answer + "<|eot_id|>", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return -logp[torch.arange(len(target)), torch.tensor(target)].sum().item(), len(target)


def test_scores_cover_the_answer_tokens_only(chat_model_dir):
    model, tokenizer = load_model(chat_model_dir, "cpu")
    q, a = "Where was Ilsa Varn born?", "Ilsa Varn was born in Lisbon."
    nll, n = answer_nll(model, tokenizer, q, a)
    [score] = score_answers(model, QAEncoder(tokenizer, "chat"), [QAPair(q, a)])
    assert score.n_tokens == n and score.avg_nll == pytest.approx(nll / n, rel=1e-5)
    # Another system prompt changes the context, never which tokens are scored.
    [other] = score_answers(model, QAEncoder(tokenizer, "chat", system_prompt="Be brief."), [QAPair(q, a)])
    assert other.n_tokens == n and other.avg_nll != pytest.approx(score.avg_nll, rel=1e-6)


def test_pum_eval_on_a_chat_model_scores_answers_under_the_template(chat_model_dir, assets, tmp_path):
    summary = evaluate(chat_model_dir, assets.data_dir, "forget10", out_dir=tmp_path, max_new_tokens=4,
                       progress=False, max_items=2)
    logs = json.loads((tmp_path / EVAL_FILE).read_text())
    assert logs["pum"]["prompt_format"] == "chat"  # auto: the tokenizer has a template
    model, tokenizer = load_model(chat_model_dir, "cpu")
    record = json.loads((assets.data_dir / "forget10_perturbed.json").read_text().splitlines()[0])
    nll, n = answer_nll(model, tokenizer, record["question"], record["answer"])
    assert logs["forget_Q_A_Prob"]["value_by_index"]["0"]["avg_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert summary["forget_Q_A_Prob"] == pytest.approx(logs["forget_Q_A_Prob"]["agg_value"])
    plain = evaluate(chat_model_dir, assets.data_dir, "forget10", out_dir=tmp_path / "plain", max_new_tokens=4,
                     progress=False, max_items=2, prompt_format="plain")
    assert plain["forget_Q_A_Prob"] != pytest.approx(summary["forget_Q_A_Prob"], rel=1e-6)
