"""The demo tokenizer: offline round trip and exact answer-only masking."""

import torch

torch.set_num_threads(1)

from transformers import AutoTokenizer  # noqa: E402

from pum.common.qa import IGNORE_INDEX, QAPair, collate  # noqa: E402
from pum.demo.authors import generate_authors, splits  # noqa: E402
from pum.demo.tokenizer import qa_texts, train_tokenizer  # noqa: E402

RECORDS = splits(generate_authors(10, 8, seed=1))["full"]


def test_saved_tokenizer_reloads_offline_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained = train_tokenizer(qa_texts(RECORDS), tmp_path, vocab_size=1000)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(loaded) == len(trained) <= 1000
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    for text in ["Question: Where was Zora Kell born?\nAnswer:", " The café, naïve — 1984!", "unseen wörds ✓"]:
        ids = loaded(text)["input_ids"]
        assert ids == trained(text)["input_ids"]
        assert ids[0] == loaded.bos_token_id
        assert loaded.decode(ids, skip_special_tokens=True) == text


def test_collated_labels_decode_to_exactly_the_answer_and_eos():
    tokenizer = train_tokenizer(qa_texts(RECORDS), vocab_size=1000)
    pairs = [QAPair(r["question"], r["answer"]) for r in RECORDS[:16]]
    batch = collate(tokenizer, pairs)
    for ids, row, mask, pair in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], pairs):
        answer_ids = [i for i in row.tolist() if i != IGNORE_INDEX]
        assert tokenizer.decode(answer_ids) == " " + pair.answer + tokenizer.eos_token
        # labels are a contiguous tail of the real tokens: the prompt is masked, padding is masked
        n_real = int(mask.sum())
        assert (row[n_real:] == IGNORE_INDEX).all()
        assert (row[n_real - len(answer_ids): n_real] != IGNORE_INDEX).all()
        prompt_ids = ids[: n_real - len(answer_ids)].tolist()
        assert tokenizer.decode(prompt_ids) == f"<s>Question: {pair.question}\nAnswer:"


def test_prompt_never_shares_a_token_with_the_answer():
    tokenizer = train_tokenizer(qa_texts(RECORDS), vocab_size=1000)
    for record in RECORDS:
        whole = tokenizer(f"Question: {record['question']}\nAnswer: {record['answer']}")["input_ids"]
        prompt = tokenizer(f"Question: {record['question']}\nAnswer:")["input_ids"]
        assert whole[: len(prompt)] == prompt  # byte-level BPE: the boundary is a token boundary
