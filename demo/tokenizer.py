"""A byte-level BPE tokenizer trained offline on the demo's QA text.

ByteLevel pre-tokenization keeps a space as part of the following word ("ĠAnswer"), so the
prompt `Question: …\\nAnswer:` and the answer ` …` never share a token and answer-only masking
(`pum.common.qa.collate`) is exact. A Metaspace pre-tokenizer merged `born?\\nAnswer:` into one
token (CPU-NOTES.md). BOS is prepended by the post-processor when special tokens are requested;
EOS is appended by `encode_pair`, not by the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def build_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """A raw `tokenizers` byte-level BPE; training stops early when no pair occurs `min_frequency` times."""
    if vocab_size < 256 + 4:
        raise ValueError(f"vocab_size must be ≥ 260 (got {vocab_size}): the 256 byte symbols and 4 special tokens come first")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers view of a raw tokenizer, with its special tokens named."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="right", clean_up_tokenization_spaces=False,
    )


def train_tokenizer(texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = 4096,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; with `out_dir`, save it so `AutoTokenizer.from_pretrained(out_dir)` reloads it offline."""
    fast = wrap(build_bpe(texts, vocab_size, min_frequency))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


def qa_texts(records: Iterable[dict]) -> list[str]:
    """The text a tokenizer should see for QA records: the prompt and the answer, as `collate` will encode them."""
    from pum.common.qa import prompt_text

    texts = []
    for record in records:
        texts.append(prompt_text(record["question"]))
        texts.append(" " + record["answer"])
    return texts
