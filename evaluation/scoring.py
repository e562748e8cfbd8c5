"""The model's side of evaluation: teacher-forced answer scores, greedy answers, ROUGE-L recall.

`score_answers` runs one forward pass per batch of (question, answer) pairs, in the prompt format of
the `QAEncoder` given (a bare tokenizer gets `auto`, `pum.common.prompts`), and keeps per answer token what every metric of `metrics.py` needs: log p(y_t),
μ_t and σ_t of log p under the model's next-token distribution (min-k++), and whether the argmax
equals y_t (extraction strength). `generate_answers` decodes greedily from left-padded prompts.
Both sort their inputs by length to pad less, and return results in input order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from tqdm.auto import tqdm

from pum.common.prompts import as_encoder
from pum.common.qa import IGNORE_INDEX, QAPair, collate, token_nll

DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_NEW_TOKENS = 200  # DESIGN.md §7


@dataclass(frozen=True)
class AnswerScore:
    """Per-token statistics of one answer (EOS included) under teacher forcing."""

    logprobs: tuple[float, ...]  # log p(y_t | q, y_<t)
    mu: tuple[float, ...]  # E_{v∼p_t}[log p_t(v)]
    sigma: tuple[float, ...]  # sqrt(Var_{v∼p_t}[log p_t(v)])
    argmax_match: tuple[bool, ...]  # argmax_v p_t(v) == y_t

    @property
    def n_tokens(self) -> int:
        return len(self.logprobs)

    @property
    def avg_nll(self) -> float:
        return -sum(self.logprobs) / self.n_tokens

    @property
    def prob(self) -> float:
        """P̄(a|q) = exp(−NLL/|a|)."""
        return math.exp(-self.avg_nll)


def _by_length(items: list, key) -> list[int]:
    return sorted(range(len(items)), key=lambda i: key(items[i]))


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_answers(model, tokenizer, pairs: list[QAPair], batch_size: int = DEFAULT_BATCH_SIZE,
                  progress: bool = False, desc: str = "scoring") -> list[AnswerScore]:
    """An `AnswerScore` per pair, teacher-forced, batched (`batch_size` sequences per forward pass)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1 (got {batch_size})")
    model.eval()
    device = _device(model)
    tokenizer = as_encoder(tokenizer)  # one prompt format for every batch
    order = _by_length(pairs, lambda p: len(p.question) + len(p.answer))
    results: list[AnswerScore | None] = [None] * len(pairs)
    with tqdm(total=len(pairs), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(tokenizer, [pairs[i] for i in chunk]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            mask = labels[:, 1:] != IGNORE_INDEX
            counts = mask.sum(dim=1).tolist()
            logprobs = (-token_nll(logits, labels))[mask]  # answer tokens only, row after row
            answer_logits = logits[:, :-1, :][mask].float()  # [answer tokens, vocabulary]
            match = answer_logits.argmax(-1) == labels[:, 1:][mask]
            # μ and σ of log p under p itself; log p is floored where p underflows to 0, so that 0·log 0 = 0.
            logp_all = torch.log_softmax(answer_logits, dim=-1).clamp(min=-1e4)
            p_all = logp_all.exp()
            mu = (p_all * logp_all).sum(-1)
            sigma = (p_all * (logp_all - mu[:, None]).square()).sum(-1).sqrt()  # two-pass: no cancellation
            columns = [t.split(counts) for t in (logprobs, mu, sigma, match)]
            for row, index in enumerate(chunk):
                if counts[row] == 0:
                    raise ValueError(f"pair {index} has no answer token to score (question {pairs[index].question[:60]!r})")
                lp, m, sd, hit = (column[row].tolist() for column in columns)
                results[index] = AnswerScore(logprobs=tuple(lp), mu=tuple(m), sigma=tuple(sd), argmax_match=tuple(hit))
            bar.update(len(chunk))
    return results  # type: ignore[return-value]


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], batch_size: int = DEFAULT_BATCH_SIZE,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = False,
                     desc: str = "generating") -> list[str]:
    """Greedy answers to `questions` in the encoder's prompt format, up to `max_new_tokens`, stopping at EOS.

    Prompts are left-padded so every row's last prompt token sits at the same position; the text
    after the prompt, up to the first stop token (EOS, or a chat template's end-of-turn token), is
    decoded without special tokens and stripped.
    """
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be ≥ 1 (got {batch_size}, {max_new_tokens})")
    model.eval()
    device = _device(model)
    encoder = as_encoder(tokenizer)
    tokenizer = encoder.tokenizer
    stops, pad = encoder.stop_token_ids(), encoder.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token: batched generation needs one")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=stops or None, bos_token_id=tokenizer.bos_token_id)
    prompts = [encoder.prompt_ids(q) for q in questions]
    order = _by_length(prompts, len)
    answers: list[str] = [""] * len(questions)
    with tqdm(total=len(questions), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                ids = prompts[index]
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config)
            for row, index in enumerate(chunk):
                new = out[row, width:].tolist()
                ends = [new.index(stop) for stop in stops if stop in new]
                new = new[: min(ends)] if ends else new
                answers[index] = tokenizer.decode(new, skip_special_tokens=True).strip()
            bar.update(len(chunk))
    return answers


@lru_cache(maxsize=1)
def _rouge_scorer():
    import logging

    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." at INFO
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_scores(reference: str, prediction: str) -> dict[str, float]:
    """ROUGE-1 recall, ROUGE-L F1 and ROUGE-L recall with Porter stemming (rouge-score), open-unlearning's three."""
    score = _rouge_scorer().score(reference, prediction)
    return {"rouge1_recall": float(score["rouge1"].recall), "rougeL_f1": float(score["rougeL"].fmeasure),
            "rougeL_recall": float(score["rougeL"].recall)}


def rouge_l_recall(reference: str, prediction: str) -> float:
    """ROUGE-L recall with Porter stemming: LCS(reference, prediction) / |reference| in words (rouge-score)."""
    return rouge_scores(reference, prediction)["rougeL_recall"]
