"""Tiny Llama-architecture models on the real TOFU data, for running the benchmark on a CPU.

    base        pretrained on text that is not TOFU's fictitious authors: TOFU's `real_authors` and
                `world_facts` question sets (repeated, so the facts are learnt) and a synthetic
                biography corpus from `pum.demo.authors` (invented authors, not TOFU's). It is the
                CPU stand-in for a pretrained model's general knowledge: model utility reads real
                authors and world facts, and the fine-tuning task vector θ − θ_base is what the
                paper's relative noise κ is measured against.
    full        the base fine-tuned on TOFU `full`: the target to unlearn from
    retain*     the base fine-tuned on retain90/95/99: forget quality's "never saw the forget set"

Fine-tuning mixes the real-author and world-fact pairs in again (`rehearsal`): a 0.2 M-parameter
model otherwise overwrites its general knowledge in a few epochs at lr 2e-3, which a pretrained LLM
fine-tuned on TOFU at 1e-5 does not. Target and retain models get the same mix.

One byte-level BPE tokenizer (trained with the base on all of that text) serves every model.

    <cache_dir>/tofu-cpu-<fingerprint of spec and data>/
        base/     COMPLETE.json written last        (built first, under base.lock)
        full/     COMPLETE.json written last        (each split under its own lock)
        retain90/ ...

Each folder is built in a private temporary folder and renamed into place when complete, under a
file lock: several processes may build different splits at once (two CPU cores build twice as fast),
and one that needs a split another is building waits for it. A cached folder loads in milliseconds.
On a GPU machine, `device="cuda"` builds the same way (bench/gpu_quality.sh, GPU_SPEC).
"""

from __future__ import annotations

import contextlib
import fcntl
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
    rehearsal: int = 1  # copies of each real-author / world-fact pair mixed into every fine-tuning epoch (0: none)
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0


TEST_SPEC = CpuModelSpec(hidden=64, layers=2, heads=4, intermediate=256, vocab_size=2048, synthetic_authors=4,
                         base_repeat=2, base_epochs=1, epochs=2, lr=3e-3)
# ~30 M parameters (8192-token vocabulary, 512 wide, 6 blocks), for one GPU (bench/gpu_quality.sh).
GPU_SPEC = CpuModelSpec(hidden=512, layers=6, heads=8, intermediate=2048, vocab_size=8192, synthetic_authors=100,
                        base_repeat=8, base_epochs=10, epochs=12, lr=5e-4, batch_size=64)


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
    """The real-author and world-fact pairs mixed into fine-tuning, `rehearsal` copies each."""
    return [pair for name in BASE_SPLITS for pair in load_qa(Path(data_dir) / f"{name}.json")] * spec.rehearsal


def _fingerprint(data_dir: Path, spec: CpuModelSpec) -> str:
    digest = hashlib.sha256(json.dumps({"v": VERSION, "spec": asdict(spec)}).encode())
    for name in ("full", "holdout10", *BASE_SPLITS):
        digest.update((data_dir / f"{name}.json").read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _lock(path: Path, blocking: bool = True):
    """An exclusive file lock; yields False at once (blocking=False) when another process holds it."""
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _done(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _build_folder(folder: Path, build, blocking: bool) -> bool:
    """Run `build(tmp)` and rename tmp to `folder` under the folder's lock, unless done; False when the lock
    is taken (blocking=False) and the folder is not done yet."""
    if _done(folder):
        return True
    with _lock(folder.with_name(f".{folder.name}.lock"), blocking) as held:
        if not held:
            return False
        if _done(folder):  # another process built it while we waited
            return True
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted build
        tmp = folder.with_name(f".{folder.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            build(tmp)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def build_tofu_models(
    data_dir: Path, cache_dir: Path, splits: tuple[str, ...] = ("full", "retain90", "retain95", "retain99"),
    spec: CpuModelSpec = CpuModelSpec(), progress: bool = True, device: str | None = None,
) -> dict[str, Path]:
    """{"base": folder, split: folder for each training split}, built once and cached.

    Splits another process is building are left to it and waited for at the end. Every split's
    model starts from the same base weights; each folder's COMPLETE.json records the spec and its
    training summary (epochs, NLL history, seconds).
    """
    data_dir = Path(data_dir)
    root = Path(cache_dir) / f"tofu-cpu-{_fingerprint(data_dir, spec)}"
    root.mkdir(parents=True, exist_ok=True)
    folders = {BASE: root / BASE, **{split: root / split for split in splits}}
    _build_folder(folders[BASE], lambda tmp: _build_base(tmp, data_dir, spec, progress, device), blocking=True)
    waiting = [split for split in splits
               if not _build_folder(folders[split], lambda tmp, s=split: _build_split(tmp, folders[BASE], data_dir, s,
                                                                                       spec, progress, device),
                                    blocking=False)]
    for split in waiting:
        log.info("waiting for another process to finish the %s model", split)
        _build_folder(folders[split], lambda tmp, s=split: _build_split(tmp, folders[BASE], data_dir, s, spec, progress,
                                                                       device), blocking=True)
    return folders


def _write_marker(folder: Path, spec: CpuModelSpec, training: dict) -> None:
    (folder / MARKER).write_text(json.dumps({"spec": asdict(spec), "training": training}, default=str, indent=1))


def _build_base(tmp: Path, data_dir: Path, spec: CpuModelSpec, progress: bool, device: str | None) -> None:
    pairs = base_corpus(data_dir, spec)
    records = load_records(data_dir / "full.json") + load_records(data_dir / "holdout10.json")
    texts = qa_texts(records) + qa_texts({"question": p.question, "answer": p.answer} for p in pairs)
    tokenizer = train_tokenizer(texts, tmp, spec.vocab_size)
    model = build_model(config_for(tokenizer, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                                   intermediate=spec.intermediate), seed=spec.seed).to(device or "cpu")
    log.info("pretraining the base model on %d pairs × %d epochs", len(pairs), spec.base_epochs)
    started = time.perf_counter()
    training = finetune(model, tokenizer, pairs, epochs=spec.base_epochs, lr=spec.lr, batch_size=spec.batch_size,
                        seed=spec.seed, progress=progress, target_nll=None)
    training["build_seconds"] = time.perf_counter() - started
    model.save_pretrained(tmp)
    _write_marker(tmp, spec, training)


def _build_split(tmp: Path, base: Path, data_dir: Path, split: str, spec: CpuModelSpec, progress: bool,
                 device: str | None) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base).to(device or "cpu")
    pairs = load_qa(data_dir / f"{split}.json") + rehearsal_pairs(data_dir, spec)
    log.info("fine-tuning the base model on %s (%d pairs with rehearsal) × %d epochs", split, len(pairs), spec.epochs)
    started = time.perf_counter()
    training = finetune(model, tokenizer, pairs, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                        seed=spec.seed, progress=progress, target_nll=None)
    training["build_seconds"] = time.perf_counter() - started
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _write_marker(tmp, spec, training)
