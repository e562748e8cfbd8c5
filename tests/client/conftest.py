"""Tiny real fixtures for the client: a byte-level BPE tokenizer trained in memory on templated QA
lines, and a random-init 2-layer `transformers` Llama over its vocabulary."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pum.common.qa import QAPair, prompt_text

torch.set_num_threads(1)

AUTHORS = ["Ilsa Varn", "Tomas Eberlin", "Mara Quell", "Odo Fenwick", "Lia Moravec", "Bram Tolle"]
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Perth", "Tunis"]
GENRES = ["poetry", "crime fiction", "essays", "fantasy", "drama", "satire"]
YEARS = ["1961", "1974", "1988", "1953", "1990", "1967"]


def _pairs(authors: list[str], offset: int) -> list[QAPair]:
    pairs = []
    for i, author in enumerate(authors):
        j = (i + offset) % len(CITIES)
        pairs += [
            QAPair(f"Where was {author} born?", f"{author} was born in {CITIES[j]}."),
            QAPair(f"What does {author} write?", f"{author} writes {GENRES[j]}."),
            QAPair(f"When was {author} born?", f"{author} was born in {YEARS[j]}."),
        ]
    return pairs


@pytest.fixture(scope="session")
def forget_pairs() -> list[QAPair]:
    return _pairs(AUTHORS[:2], 0)  # 6 pairs


@pytest.fixture(scope="session")
def retain_pairs() -> list[QAPair]:
    return _pairs(AUTHORS[2:], 3)  # 12 pairs


@pytest.fixture(scope="session")
def tokenizer(forget_pairs, retain_pairs) -> PreTrainedTokenizerFast:
    lines = [f"{prompt_text(p.question)} {p.answer}" for p in forget_pairs + retain_pairs] * 2
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="session")
def make_model(tokenizer):
    """A factory: a fresh tiny LlamaForCausalLM (float32, eval-free dropout) whose weights depend only on `seed`."""

    def build(seed: int = 0) -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)

    return build


@pytest.fixture(scope="session")
def make_learned_model(make_model, tokenizer, forget_pairs, retain_pairs):
    """A factory: a fresh copy of the tiny model after 30 full-batch AdamW steps on forget + retain (it knows the
    answers). Unlearning starts from such a model in use; on a random one, some gradients are float-rounding
    cancellations that AdamW turns into full steps, so two equal computations in another order drift apart."""
    from pum.common.qa import collate, sequence_nll

    model = make_model(0)
    batch = collate(tokenizer, forget_pairs + retain_pairs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(30):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, counts = sequence_nll(logits, batch["labels"])
        optimizer.zero_grad()
        (nll.sum() / counts.sum()).backward()
        optimizer.step()
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def build(seed: int = 0) -> LlamaForCausalLM:  # the seed is ignored: one learned model
        fresh = make_model(seed)
        fresh.load_state_dict(state)
        return fresh

    return build


@pytest.fixture
def model(make_model) -> LlamaForCausalLM:
    return make_model(0)


@pytest.fixture
def model_dir(tmp_path, make_model, tokenizer):
    """The tiny model with its tokenizer in Hugging Face format, as a server would load it."""
    path = tmp_path / "model"
    make_model(0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
