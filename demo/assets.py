"""The demo's data, tokenizer and fine-tuned tiny model, built once offline and cached (DESIGN.md §9).

    build_or_load(cache_dir)  ->  cache_dir/demo-<fingerprint>/
                                      data/     TOFU-shaped splits (pum.demo.authors)
                                      model/    save_pretrained model (safetensors) + tokenizer
                                      COMPLETE.json   written last: parameters and training summary

The fingerprint hashes every parameter that changes the result and `VERSION`. A build happens
in a private temporary folder that is renamed into place once complete, so an interrupted build
leaves nothing that looks finished and is simply redone, and two concurrent builders never mix files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pum.common.qa import QAPair, load_qa, load_records

log = logging.getLogger(__name__)

VERSION = 1  # bump whenever the generator, tokenizer or training would produce different files
MARKER = "COMPLETE.json"
CACHE_ENV = "PUM_CACHE_DIR"


@dataclass(frozen=True)
class TrainSpec:
    """How the tokenizer and the tiny model are made; every field is part of the cache fingerprint."""

    vocab_size: int = 4096  # BPE upper bound; on the demo text training stops near 2 k tokens
    hidden: int = 128  # 128/2/4/512 tied: 0.81 M parameters, memorises 100 authors in ~14 epochs (CPU-NOTES.md)
    layers: int = 2
    heads: int = 4
    intermediate: int = 512
    tie: bool = True  # tied input/output embeddings
    max_epochs: int = 40  # upper bound; training stops at target_nll
    lr: float = 1e-3  # AdamW; CPU-NOTES.md: fine-tune at ~1e-3
    batch_size: int = 32
    target_nll: float | None = 0.1  # answer NLL per token at which the facts count as memorised; None: all epochs
    init_seed: int = 0  # model initialisation and batch order


DEFAULT_SPEC = TrainSpec()
# For tests: 12 authors × 6 pairs, a 64-wide model, a few seconds of training on one thread.
TINY_SPEC = TrainSpec(vocab_size=1024, hidden=64, layers=2, heads=4, intermediate=256, max_epochs=25, lr=3e-3,
                      batch_size=16, target_nll=None)


@dataclass(frozen=True)
class DemoAssets:
    root: Path  # the cache entry
    data_dir: Path  # the TOFU-shaped JSON-lines splits: full.json, forget10.json, retain90.json, ...
    model_dir: Path  # model and tokenizer, for `from_pretrained`
    fingerprint: str
    params: dict = field(compare=False)  # what the fingerprint hashes
    training: dict = field(compare=False)  # finetune's summary (epochs, nll, history, seconds, ...)
    built: bool = field(default=False, compare=False)  # True when this call built the entry, False when it was loaded

    def split(self, name: str) -> Path:
        """The file of a split by stem ("forget10", "retain_perturbed", ...) or file name."""
        path = self.data_dir / (name if name.endswith((".json", ".jsonl")) else f"{name}.json")
        if not path.is_file():
            known = sorted(p.stem for p in self.data_dir.glob("*.json"))
            raise ValueError(f"no split {name!r} in {self.data_dir}; known: {', '.join(known)}")
        return path

    def pairs(self, name: str) -> list[QAPair]:
        return load_qa(self.split(name))

    def records(self, name: str) -> list[dict]:
        return load_records(self.split(name))

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)

    def load_model(self):
        """The fine-tuned model, in eval mode (a fresh copy each call)."""
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(str(self.model_dir), local_files_only=True).eval()


def default_cache_dir() -> Path:
    """$PUM_CACHE_DIR, else ~/.cache/pum."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pum")


def fingerprint(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _params(n_authors: int, pairs_per_author: int, seed: int, spec: TrainSpec) -> dict:
    return {"version": VERSION, "n_authors": n_authors, "pairs_per_author": pairs_per_author, "seed": seed,
            "spec": dataclasses.asdict(spec)}


def _complete(root: Path, digest: str) -> dict | None:
    """The marker's content when `root` is a finished entry for `digest`, else None."""
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    needed = [root / "data" / "full.json", root / "model" / "config.json", root / "model" / "tokenizer.json",
              root / "model" / "model.safetensors"]
    if marker.get("fingerprint") != digest or not all(p.is_file() for p in needed):
        return None
    return marker


def _assets(root: Path, digest: str, marker: dict, built: bool) -> DemoAssets:
    return DemoAssets(root=root, data_dir=root / "data", model_dir=root / "model", fingerprint=digest,
                      params=marker["params"], training=marker["training"], built=built)


def _build_into(tmp: Path, params: dict, digest: str, progress: bool) -> dict:
    """Generate, tokenize, train and save everything under `tmp`; the marker is written last."""
    from pum.demo.authors import write_dataset
    from pum.demo.tiny_model import build_model, config_for, count_parameters, finetune
    from pum.demo.tokenizer import qa_texts, train_tokenizer

    spec = TrainSpec(**params["spec"])
    start = time.perf_counter()
    data_dir = write_dataset(tmp / "data", params["n_authors"], params["pairs_per_author"], params["seed"])
    # The tokenizer sees the holdout authors too: trained on `full` alone, forget names would be single
    # tokens and holdout names byte pieces, a difference membership-inference metrics would pick up.
    texts = qa_texts(load_records(data_dir / "full.json") + load_records(data_dir / "holdout10.json"))
    tokenizer = train_tokenizer(texts, tmp / "model", spec.vocab_size)
    config = config_for(tokenizer, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
                        intermediate=spec.intermediate, tie=spec.tie)
    model = build_model(config, seed=spec.init_seed)
    log.info("demo build: %d authors, vocabulary %d, %d parameters", params["n_authors"], len(tokenizer),
             count_parameters(model))
    training = finetune(model, tokenizer, load_qa(data_dir / "full.json"), epochs=spec.max_epochs, lr=spec.lr,
                        batch_size=spec.batch_size, seed=spec.init_seed, progress=progress,
                        target_nll=spec.target_nll)
    model.save_pretrained(str(tmp / "model"))
    training["parameters"] = count_parameters(model)
    training["vocab_size"] = len(tokenizer)
    training["build_seconds"] = time.perf_counter() - start
    marker = {"fingerprint": digest, "params": params, "training": training}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    return marker


def build_or_load(cache_dir: str | Path | None = None, *, n_authors: int = 100, pairs_per_author: int = 20,
                  seed: int = 0, spec: TrainSpec = DEFAULT_SPEC, threads: int | None = None,
                  progress: bool = True) -> DemoAssets:
    """The cached demo assets for these parameters, building them first if needed (~1–2 min on 2 cores).

    `cache_dir` defaults to `default_cache_dir()`. `threads` is torch's thread count during a build
    (None: every core); the caller's setting is restored afterwards. A cache hit only reads the marker.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    params = _params(n_authors, pairs_per_author, seed, spec)
    digest = fingerprint(params)
    root = cache_dir / f"demo-{digest[:16]}"
    marker = _complete(root, digest)
    if marker is not None:
        log.info("demo assets loaded from %s", root)
        return _assets(root, digest, marker, built=False)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be ≥ 1 or None for every core (got {threads})")

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{root.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    log.info("building demo assets in %s (%d torch threads)", root, torch.get_num_threads())
    try:
        marker = _build_into(tmp, params, digest, progress)
        if root.exists() and _complete(root, digest) is None:
            shutil.rmtree(root)  # an interrupted or foreign build: redo it
        try:
            tmp.rename(root)
        except OSError:
            if _complete(root, digest) is None:
                raise
            log.info("another process finished %s first; using its build", root)
            marker = _complete(root, digest)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("demo assets ready in %s (%.1f s)", root, marker["training"]["build_seconds"])
    return _assets(root, digest, marker, built=True)


def tiny_assets(tmp_dir: str | Path, *, threads: int | None = 1) -> DemoAssets:
    """A miniature of the demo for tests: 12 authors × 6 pairs, a 64-wide model, built in seconds."""
    return build_or_load(tmp_dir, n_authors=12, pairs_per_author=6, seed=0, spec=TINY_SPEC,
                         threads=threads, progress=False)
