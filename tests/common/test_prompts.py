"""Prompt formats on a tokenizer with a real (Llama-3-style) chat template: the answer mask, token by token."""

from __future__ import annotations

import pytest

from pum.common.prompts import QAEncoder, folder_has_chat_template, resolve_prompt_format
from pum.common.qa import IGNORE_INDEX, collate

Q, A = "Where was Ilsa Varn born?", "Ilsa Varn was born in Lisbon."
# What open-unlearning's Llama-3.2-1B-Instruct config renders (system prompt, pinned date, generation prompt).
CHAT_PROMPT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
               "Today Date: 10 Apr 2025\n\nYou are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>"
               f"\n\n{Q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_mask_covers_the_answer_and_its_end_of_turn_only(chat_tokenizer):
    # Prepare: the expected sequence, tokenized independently of the encoder.
    prompt_ids, answer_ids = ids(chat_tokenizer, CHAT_PROMPT), ids(chat_tokenizer, A + "<|eot_id|>")
    # Execute
    batch = collate(QAEncoder(chat_tokenizer, "chat"), [(Q, A)])
    # Assert: every prompt token is masked, every answer token (and <|eot_id|>, the Instruct EOS) is scored.
    row, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert row == prompt_ids + answer_ids
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    first = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    assert chat_tokenizer.decode(row[:first]) == CHAT_PROMPT  # the mask ends exactly after "assistant…\n\n"
    assert chat_tokenizer.decode(labels[first:]) == A + "<|eot_id|>"
    assert row.count(chat_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")) == 1  # the template's BOS, not a second
    # Tokenizing prompt and answer apart gives the tokens of the whole conversation (open-unlearning's way).
    assert row == ids(chat_tokenizer, CHAT_PROMPT + A + "<|eot_id|>")


@pytest.fixture(scope="module")
def tokenizer_without_template(chat_tokenizer_factory):
    tokenizer = chat_tokenizer_factory()
    tokenizer.chat_template = None
    return tokenizer


def test_chat_appends_eos_when_the_end_of_turn_is_not_eos(chat_tokenizer_factory):
    # A base tokenizer (EOS <|end_of_text|>) under the Instruct template: <|eot_id|> ends the turn and
    # EOS follows it, as open-unlearning's preprocess_chat_instance appends it.
    base = chat_tokenizer_factory(eos="<|end_of_text|>")
    prompt_ids, answer_ids = QAEncoder(base, "chat").encode_pair(Q, A)
    assert answer_ids == ids(base, A + "<|eot_id|>") + [base.convert_tokens_to_ids("<|end_of_text|>")]
    assert prompt_ids == ids(base, CHAT_PROMPT)
    stops = QAEncoder(base, "chat").stop_token_ids()
    assert stops == [base.eos_token_id, base.convert_tokens_to_ids("<|eot_id|>")]


def test_plain_format_is_unchanged(chat_tokenizer):
    batch = collate(QAEncoder(chat_tokenizer, "plain"), [(Q, A)])
    row, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    prompt = chat_tokenizer(f"Question: {Q}\nAnswer:")["input_ids"]
    answer = ids(chat_tokenizer, " " + A) + [chat_tokenizer.eos_token_id]
    assert row == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer


def test_auto_picks_chat_when_there_is_a_template(chat_tokenizer, tokenizer_without_template):
    assert QAEncoder(chat_tokenizer).prompt_format == "chat"
    assert QAEncoder(tokenizer_without_template).prompt_format == "plain"
    assert collate(chat_tokenizer, [(Q, A)])["labels"].tolist() == collate(QAEncoder(chat_tokenizer, "chat"), [(Q, A)])["labels"].tolist()
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        QAEncoder(tokenizer_without_template, "chat")
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        resolve_prompt_format("llama", True)


def test_batch_masks_each_row_at_its_own_boundary(chat_tokenizer):
    pairs = [(Q, A), ("What does Odo Fenwick write?", "Poetry.")]
    encoder = QAEncoder(chat_tokenizer, "chat")
    batch = collate(encoder, pairs)
    for i, (q, a) in enumerate(pairs):
        prompt_ids, answer_ids = encoder.encode_pair(q, a)
        labels = batch["labels"][i].tolist()
        scored = [x for x in labels if x != IGNORE_INDEX]
        assert scored == answer_ids and labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert batch["attention_mask"][i].sum().item() == len(prompt_ids) + len(answer_ids)


def test_stop_tokens_and_template_files(chat_tokenizer, tmp_path):
    eot = chat_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert QAEncoder(chat_tokenizer, "chat").stop_token_ids() == [eot]
    assert QAEncoder(chat_tokenizer, "plain").stop_token_ids() == [eot]
    chat_tokenizer.save_pretrained(tmp_path / "tok")
    assert folder_has_chat_template(tmp_path / "tok")
    assert not folder_has_chat_template(tmp_path)


def test_a_template_without_system_role_gets_no_system_message(chat_tokenizer_factory):
    # Gemma's template raises on a system turn; open-unlearning's Gemma config has no system prompt.
    tokenizer = chat_tokenizer_factory()
    tokenizer.chat_template = (
        "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
        "{%- for m in messages %}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<|start_header_id|>' + role + '<|end_header_id|>' + m['content'] + '<|eot_id|>' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<|start_header_id|>model<|end_header_id|>' }}{%- endif %}")
    prompt_ids, answer_ids = QAEncoder(tokenizer, "chat").encode_pair(Q, A)
    assert tokenizer.decode(prompt_ids) == f"<|start_header_id|>user<|end_header_id|>{Q}<|eot_id|><|start_header_id|>model<|end_header_id|>"
    assert tokenizer.decode(answer_ids) == A + "<|eot_id|>"
    broken = chat_tokenizer_factory()
    broken.chat_template = tokenizer.chat_template.replace("set role = 'model' if", "set role = 'x' if")
    with pytest.raises(ValueError, match="does not write the generation prompt as the start"):
        QAEncoder(broken, "chat").encode_pair(Q, A)
