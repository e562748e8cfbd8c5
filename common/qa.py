"""Question–answer data in TOFU's shape: loading, answer-masked batches, answer likelihoods.

A record is a JSON object with at least `question` and `answer`. Files are JSON lines (as the
TOFU dataset ships) or one JSON array. How a pair becomes prompt and answer tokens is its prompt
format (`pum.common.prompts`: `plain` = `Question: {q}\\nAnswer:` + ` {a}` + EOS, or the
tokenizer's chat template); every function that takes a `tokenizer` here also takes a
`QAEncoder`, which fixes the format (a bare tokenizer gets `auto`: chat when it has a template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pum.common.prompts import as_encoder
from pum.common.prompts import plain_prompt as prompt_text  # noqa: F401  (the plain format's prompt)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str


def load_records(path: str | Path) -> list[dict]:
    """All records of a JSON-lines or JSON-array file, as dicts."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        return []
    if text.startswith("["):
        records = json.loads(text)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: every record must be a JSON object")
    return records


def load_qa(path: str | Path) -> list[QAPair]:
    """The question–answer pairs of a split file or saved split folder (`pum.common.splits`); refuses
    records without both fields."""
    from pum.common.splits import read_split

    records = load_records(path) if Path(path).is_file() else read_split(path)[0]
    pairs = []
    for number, record in enumerate(records, start=1):
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ValueError(f"{path}: record {number} needs string fields 'question' and 'answer'")
        pairs.append(QAPair(question, answer))
    if not pairs:
        raise ValueError(f"{path}: no question–answer records")
    return pairs


def collate(tokenizer, pairs: list[tuple[str, str]] | list[QAPair], max_length: int = 512) -> dict[str, torch.Tensor]:
    """A right-padded batch: `labels` hold the answer tokens and IGNORE_INDEX elsewhere.

    `tokenizer` is a tokenizer (format `auto`) or a `QAEncoder` (its own format).
    Pads to the longest sequence of the batch, not to a fixed length (it halves the cost on
    short templated QA). Sequences longer than `max_length` lose prompt tokens from the left,
    never answer tokens, unless the answer alone is longer.
    """
    encoder = as_encoder(tokenizer)
    pad_id = encoder.pad_token_id
    rows = []
    for pair in pairs:
        question, answer = (pair.question, pair.answer) if isinstance(pair, QAPair) else pair
        prompt_ids, answer_ids = encoder.encode_pair(question, answer)
        ids = (prompt_ids + answer_ids)[-max_length:]
        n_answer = min(len(answer_ids), len(ids))
        rows.append((ids, [IGNORE_INDEX] * (len(ids) - n_answer) + ids[len(ids) - n_answer:]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood [batch, seq-1] in float32, zero where labels are ignored."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.clamp(min=0).reshape(-1),
        reduction="none",
    ).view_as(shifted_labels)
    return nll * mask


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL(y|x) summed over each sequence's answer tokens, and the number of answer tokens."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    return token_nll(logits, labels).sum(dim=1), counts


@torch.no_grad()
def answer_probabilities(model, tokenizer, pairs: list[QAPair], batch_size: int = 32) -> list[float]:
    """P̄(a|q) = exp(−NLL(a|q)/|a|) for each pair (DESIGN.md §7)."""
    model.eval()
    device = next(model.parameters()).device
    probabilities: list[float] = []
    tokenizer = as_encoder(tokenizer)  # one format for every batch
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate(tokenizer, pairs[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, counts = sequence_nll(logits, batch["labels"])
        probabilities.extend(torch.exp(-nll / counts.clamp(min=1)).tolist())
    return probabilities


def mean_answer_probability(model, tokenizer, pairs: list[QAPair], batch_size: int = 32) -> float:
    values = answer_probabilities(model, tokenizer, pairs, batch_size)
    return sum(values) / len(values)
