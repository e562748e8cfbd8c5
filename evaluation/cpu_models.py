"""Tiny Llama-architecture models on the real TOFU data, for running the benchmark on a CPU.

One byte-level BPE tokenizer trained on TOFU's text, then one model fine-tuned on `full` (the
target to unlearn from) and one per retain split (retain90/95/99: the references of forget
quality, "the model that never saw the forget set"). Cached by a fingerprint of the data and
the settings, so a second run loads them in seconds. On a GPU machine the benchmark scripts take
real Hugging Face model folders instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pum.common.qa import load_qa, load_records
from pum.demo.tiny_model import build_model, config_for, finetune
from pum.demo.tokenizer import qa_texts, train_tokenizer

log = logging.getLogger(__name__)
VERSION = 1
MARKER = "COMPLETE.json"


@dataclass(frozen=True)
class CpuModelSpec:
    hidden: int = 128  # 128/2/4/512 tied: 0.8 M parameters (CPU-NOTES.md)
    layers: int = 2
    heads: int = 4
    intermediate: int = 512
    vocab_size: int = 4096  # BPE upper bound
    epochs: int = 20  # fixed budget: TOFU's free-text answers are not memorised like templates
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0


TEST_SPEC = CpuModelSpec(hidden=64, layers=2, heads=4, intermediate=256, vocab_size=2048, epochs=2, lr=3e-3)


def _fingerprint(data_dir: Path, splits: tuple[str, ...], spec: CpuModelSpec) -> str:
    digest = hashlib.sha256(json.dumps({"v": VERSION, "spec": asdict(spec), "splits": splits}).encode())
    for name in ("full", "holdout10", *splits):
        digest.update((data_dir / f"{name}.json").read_bytes())
    return digest.hexdigest()[:16]


def build_tofu_models(
    data_dir: Path, cache_dir: Path, splits: tuple[str, ...] = ("full", "retain90", "retain95", "retain99"),
    spec: CpuModelSpec = CpuModelSpec(), progress: bool = True,
) -> dict[str, Path]:
    """{split: model folder} for each training split, built once and cached."""
    root = Path(cache_dir) / f"tofu-cpu-{_fingerprint(Path(data_dir), splits, spec)}"
    folders = {split: root / split for split in splits}
    if (root / MARKER).exists():
        return folders
    building = root.with_name(root.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    texts = qa_texts(load_records(Path(data_dir) / "full.json") + load_records(Path(data_dir) / "holdout10.json"))
    tokenizer = train_tokenizer(texts, building / "tokenizer", spec.vocab_size)
    summary = {}
    for split in splits:
        model = build_model(config_for(tokenizer, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                                       intermediate=spec.intermediate), seed=spec.seed)
        log.info("fine-tuning the CPU model on %s", split)
        summary[split] = finetune(model, tokenizer, load_qa(Path(data_dir) / f"{split}.json"), epochs=spec.epochs,
                                  lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed, progress=progress,
                                  target_nll=None)
        model.save_pretrained(building / split)
        tokenizer.save_pretrained(building / split)
    (building / MARKER).write_text(json.dumps({"spec": asdict(spec), "training": summary}, default=str, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    building.rename(root)
    return folders
