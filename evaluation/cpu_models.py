"""Tiny Llama-architecture models on the real TOFU data, for running the benchmark on a CPU.

    base        pretrained on text that is not TOFU's fictitious authors: TOFU's `real_authors` and
                `world_facts` question sets (repeated, so the facts are learnt) and a synthetic
                biography corpus from `pum.demo.authors` (invented authors, not TOFU's). It is the
                CPU stand-in for a pretrained model's general knowledge: model utility reads real
                authors and world facts, and the fine-tuning task vector θ − θ_base is what the
                paper's relative noise κ is measured against.
    full        the base fine-tuned on TOFU `full`: the target to unlearn from
    retain*     the base fine-tuned on retain90/95/99: forget quality's "never saw the forget set"

One byte-level BPE tokenizer is trained on all of that text. Everything is cached by a
fingerprint of the data and the spec, so a second run loads the folders in milliseconds; a build
happens in a private folder renamed into place when complete. On a GPU machine the benchmark
scripts take real Hugging Face model folders instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pum.common.qa import QAPair, load_qa, load_records
from pum.demo.tiny_model import build_model, config_for, finetune
from pum.demo.tokenizer import qa_texts, train_tokenizer

log = logging.getLogger(__name__)
VERSION = 2  # 2: a base model pretrained on real authors, world facts and synthetic biographies
MARKER = "COMPLETE.json"
BASE = "base"
BASE_SPLITS = ("real_authors", "world_facts")  # TOFU's general-knowledge question sets


@dataclass(frozen=True)
class CpuModelSpec:
    hidden: int = 64  # 64/2/4/256 tied with a 2 k vocabulary: 0.23 M parameters, ~3× cheaper a step than 128/512
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    vocab_size: int = 2048  # BPE upper bound
    synthetic_authors: int = 100  # invented authors × 20 pairs in the base corpus (pum.demo.authors, seed 1)
    base_repeat: int = 8  # each real-authors / world-facts pair appears this often per base epoch
    base_epochs: int = 10  # pretraining epochs over the base corpus
    epochs: int = 12  # fine-tuning epochs on full / retain*: TOFU's free-text answers are not memorised like templates
    rehearsal: int = 1  # base pairs mixed into each fine-tuning epoch, per real/world pair (0: none)
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0


TEST_SPEC = CpuModelSpec(hidden=64, layers=2, heads=4, intermediate=256, vocab_size=2048, synthetic_authors=4,
                         base_repeat=2, base_epochs=1, epochs=2, lr=3e-3)


def base_corpus(data_dir: Path, spec: CpuModelSpec) -> list[QAPair]:
    """The base model's training pairs: real authors and world facts `base_repeat` times, then the synthetic biographies."""
    from pum.demo.authors import generate_authors, splits

    general = [pair for name in BASE_SPLITS for pair in load_qa(Path(data_dir) / f"{name}.json")]
    synthetic = []
    if spec.synthetic_authors:
        records = splits(generate_authors(max(2, spec.synthetic_authors), 20, seed=1))["full"]
        synthetic = [QAPair(r["question"], r["answer"]) for r in records]
    return general * spec.base_repeat + synthetic


def rehearsal_pairs(data_dir: Path, spec: CpuModelSpec) -> list[QAPair]:
    """Real-author and world-fact pairs mixed into fine-tuning (`rehearsal` copies each): a 0.8 M model
    otherwise overwrites its general knowledge in 20 epochs at lr 1e-3, which a pretrained LLM fine-tuned
    on TOFU at 1e-5 does not."""
    return [pair for name in BASE_SPLITS for pair in load_qa(Path(data_dir) / f"{name}.json")] * spec.rehearsal


def _fingerprint(data_dir: Path, splits: tuple[str, ...], spec: CpuModelSpec) -> str:
    digest = hashlib.sha256(json.dumps({"v": VERSION, "spec": asdict(spec), "splits": splits}).encode())
    for name in ("full", "holdout10", *BASE_SPLITS, *splits):
        digest.update((data_dir / f"{name}.json").read_bytes())
    return digest.hexdigest()[:16]


def build_tofu_models(
    data_dir: Path, cache_dir: Path, splits: tuple[str, ...] = ("full", "retain90", "retain95", "retain99"),
    spec: CpuModelSpec = CpuModelSpec(), progress: bool = True,
) -> dict[str, Path]:
    """{"base": folder, split: folder for each training split}, built once and cached.

    Every split's model starts from the same base weights. COMPLETE.json records the spec and each
    model's training summary (epochs, NLL history, seconds).
    """
    data_dir = Path(data_dir)
    root = Path(cache_dir) / f"tofu-cpu-{_fingerprint(data_dir, splits, spec)}"
    folders = {BASE: root / BASE, **{split: root / split for split in splits}}
    if (root / MARKER).exists():
        return folders
    building = root.with_name(f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _build_into(building, data_dir, splits, spec, progress)
        if root.exists() and not (root / MARKER).exists():
            shutil.rmtree(root)  # an interrupted build of an older version: redo it
        try:
            building.rename(root)
        except OSError:
            if not (root / MARKER).exists():
                raise
            log.info("another process finished %s first; using its build", root)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folders


def _build_into(building: Path, data_dir: Path, splits: tuple[str, ...], spec: CpuModelSpec, progress: bool) -> None:
    base_pairs = base_corpus(data_dir, spec)
    records = load_records(data_dir / "full.json") + load_records(data_dir / "holdout10.json")
    texts = qa_texts(records) + qa_texts({"question": p.question, "answer": p.answer} for p in base_pairs)
    tokenizer = train_tokenizer(texts, building / "tokenizer", spec.vocab_size)
    started = time.perf_counter()
    model = build_model(config_for(tokenizer, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                                   intermediate=spec.intermediate), seed=spec.seed)
    log.info("pretraining the CPU base model on %d pairs × %d epochs", len(base_pairs), spec.base_epochs)
    summary = {BASE: finetune(model, tokenizer, base_pairs, epochs=spec.base_epochs, lr=spec.lr,
                              batch_size=spec.batch_size, seed=spec.seed, progress=progress, target_nll=None)}
    model.save_pretrained(building / BASE)
    tokenizer.save_pretrained(building / BASE)
    rehearsal = rehearsal_pairs(data_dir, spec)
    for split in splits:
        model = type(model).from_pretrained(building / BASE)
        log.info("fine-tuning the CPU base model on %s (+%d rehearsal pairs)", split, len(rehearsal))
        summary[split] = finetune(model, tokenizer, load_qa(data_dir / f"{split}.json") + rehearsal,
                                  epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed,
                                  progress=progress, target_nll=None)
        model.save_pretrained(building / split)
        tokenizer.save_pretrained(building / split)
    summary["build_seconds"] = time.perf_counter() - started
    (building / MARKER).write_text(json.dumps({"spec": asdict(spec), "training": summary}, default=str, indent=1))
