"""TOFU evaluation of one model, with the retain model as reference (DESIGN.md §7).

    evaluate(model_dir, data_dir, forget_split, retain_model_dir)
        ├── load_tofu            the splits, checked and fingerprinted           (data.py)
        ├── evaluate_model       per-item values for the model                    (scoring.py, metrics.py)
        ├── reference document   the retain model's per-item values: evaluated the same way, or read
        │                        from its cached TOFU_EVAL.json when data, settings and weights match
        └── summarise            aggregates, floors marked                        (summary.py)
    out_dir/TOFU_EVAL.json     per-item values     out_dir/TOFU_SUMMARY.json   aggregates
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pum.common.qa import QAPair

from . import metrics
from .data import PERTURBED_ROLES, TofuData, load_tofu
from .scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, AnswerScore, generate_answers, rouge_l_recall, score_answers
from .summary import check_reference, summarise

log = logging.getLogger(__name__)

FORMAT = 1  # bump when TOFU_EVAL.json's content changes meaning
EVAL_FILE = "TOFU_EVAL.json"
SUMMARY_FILE = "TOFU_SUMMARY.json"


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = DEFAULT_BATCH_SIZE  # sequences per forward pass / per generate call; no effect on values
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # greedy generation budget for ROUGE
    min_k: float = metrics.MIN_K  # fraction of tokens of min-k and min-k++


def _mia(score: AnswerScore, answer: str, k: float) -> dict[str, float]:
    return {"loss": metrics.mia_loss(score.avg_nll), "zlib": metrics.mia_zlib(score.avg_nll, answer),
            "min_k": metrics.mia_min_k(score.logprobs, k),
            "min_k_plus_plus": metrics.mia_min_k_plus_plus(score.logprobs, score.mu, score.sigma, k)}


def _perturbed_items(model, tokenizer, role: str, records: list[dict], options: EvalOptions, progress: bool) -> list[dict]:
    """Per question: P̄ of the answer, truth ratio, greedy answer and ROUGE-L recall (+ ES and MIA on forget)."""
    reference_key = PERTURBED_ROLES[role][1]
    pairs, spans = [], []
    for r in records:
        answers = [r["answer"]] + ([] if reference_key == "answer" else [r[reference_key]]) + list(r["perturbed_answer"])
        spans.append((len(pairs), len(answers)))
        pairs.extend(QAPair(r["question"], a) for a in answers)
    scores = score_answers(model, tokenizer, pairs, options.batch_size, progress, desc=f"{role}: scoring")
    generations = generate_answers(model, tokenizer, [r["question"] for r in records], options.batch_size,
                                   options.max_new_tokens, progress, desc=f"{role}: generating")
    items = []
    for r, (start, count), generation in zip(records, spans, generations):
        answer = scores[start]
        reference = answer if reference_key == "answer" else scores[start + 1]
        perturbed = scores[start + 1 + (reference_key != "answer") : start + count]
        item = {"question": r["question"], "answer": r["answer"], "prob": answer.prob, "avg_nll": answer.avg_nll,
                "n_tokens": answer.n_tokens, "reference_prob": reference.prob,
                "perturbed_probs": [p.prob for p in perturbed],
                "truth_ratio": metrics.truth_ratio(reference.avg_nll, [p.avg_nll for p in perturbed]),
                "generation": generation, "rouge_l_recall": rouge_l_recall(r["answer"], generation)}
        if reference_key == "answer":  # real authors / world facts: the answer against its wrong options
            item["normalised_prob"] = metrics.normalised_prob(answer.prob, [p.prob for p in perturbed])
        if role == "forget":
            item["extraction_strength"] = metrics.extraction_strength(answer.argmax_match)
            item["mia"] = _mia(answer, r["answer"], options.min_k)
        items.append(item)
    return items


def _holdout_items(model, tokenizer, records: list[dict], options: EvalOptions, progress: bool) -> list[dict]:
    pairs = [QAPair(r["question"], r["answer"]) for r in records]
    scores = score_answers(model, tokenizer, pairs, options.batch_size, progress, desc="holdout: scoring")
    return [{"question": r["question"], "answer": r["answer"], "avg_nll": s.avg_nll, "n_tokens": s.n_tokens,
             "mia": _mia(s, r["answer"], options.min_k)} for r, s in zip(records, scores)]


def evaluate_model(model, tokenizer, data: TofuData, options: EvalOptions = EvalOptions(),
                   progress: bool = False) -> dict:
    """The evaluation document (TOFU_EVAL.json's content, without `model`) of a loaded model."""
    splits = {}
    for role in data.records:
        if role == "holdout":
            splits[role] = _holdout_items(model, tokenizer, data.records[role], options, progress)
        else:
            splits[role] = _perturbed_items(model, tokenizer, role, data.records[role], options, progress)
    return {"format": FORMAT, "forget_split": data.forget_split, "holdout_split": data.holdout_split,
            "retain_split": data.retain_split, "data_dir": str(data.data_dir), "files": data.files,
            "digests": data.digests, "missing": data.missing, "max_items": data.max_items,
            "options": dataclasses.asdict(options), "splits": splits}


# ---------------------------------------------------------------- models, files and the reference cache


def model_stamp(model_dir: str | Path) -> str:
    """A cheap identity of a saved model: names, sizes and mtimes of its config and weight files."""
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model_dir).iterdir()
                     if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin")))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def load_model(model_dir: str | Path, device: str | None = None):
    """(model in eval mode, tokenizer) from a local Hugging Face folder; cuda when available."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved model (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype="auto")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def _evaluate_dir(model_dir: Path, data: TofuData, options: EvalOptions, progress: bool, device: str | None) -> dict:
    model, tokenizer = load_model(model_dir, device)
    log.info("evaluating %s on %s (%s)", model_dir, data.data_dir, data.forget_split)
    doc = evaluate_model(model, tokenizer, data, options, progress)
    doc["model"] = {"dir": str(model_dir), "stamp": model_stamp(model_dir)}
    return doc


def _write_json(path: Path, value: dict) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_eval(path: str | Path) -> dict:
    """A TOFU_EVAL.json (a file, or a folder holding one)."""
    path = Path(path)
    path = path / EVAL_FILE if path.is_dir() else path
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: format {doc.get('format')!r}, this code reads format {FORMAT}; re-evaluate")
    return doc


def _fresh(doc: dict, data: TofuData, options: EvalOptions, stamp: str) -> bool:
    """A cached document is reused only when everything that changes its values is the same."""
    return (doc.get("forget_split") == data.forget_split and doc.get("digests") == data.digests
            and doc.get("max_items") == data.max_items and doc.get("model", {}).get("stamp") == stamp
            and {k: v for k, v in doc.get("options", {}).items() if k != "batch_size"}
            == {k: v for k, v in dataclasses.asdict(options).items() if k != "batch_size"})


def reference_eval(retain: str | Path, data: TofuData, options: EvalOptions, progress: bool = False,
                   retain_out_dir: str | Path | None = None, device: str | None = None) -> dict:
    """The retain model's evaluation document, from its cache when still valid.

    `retain` is a saved model folder (its evaluation is cached in `retain_out_dir`, default the
    model folder, and reused while data, settings and weights are unchanged), or a precomputed
    TOFU_EVAL.json / a folder holding one but no model (used when its forget and holdout data match).
    """
    retain = Path(retain)
    is_model = retain.is_dir() and (retain / "config.json").is_file()
    if not is_model:
        if not (retain.is_file() or (retain / EVAL_FILE).is_file()):
            raise FileNotFoundError(f"{retain} is neither a saved model nor a {EVAL_FILE} (or a folder with one)")
        doc = read_eval(retain)
        probe = {"forget_split": data.forget_split, "max_items": data.max_items, "digests": data.digests,
                 "options": dataclasses.asdict(options)}
        check_reference(probe, doc)
        log.info("using the precomputed retain evaluation %s", retain)
        return doc
    cache_dir = Path(retain_out_dir) if retain_out_dir is not None else retain
    cached = cache_dir / EVAL_FILE
    if cached.is_file():
        try:
            doc = read_eval(cached)
            if _fresh(doc, data, options, model_stamp(retain)):
                log.info("reusing the retain model's evaluation %s", cached)
                return doc
        except (ValueError, OSError) as err:
            log.warning("ignoring the cached retain evaluation %s: %s", cached, err)
        log.info("the cached retain evaluation %s is stale; evaluating the retain model again", cached)
    doc = _evaluate_dir(retain, data, options, progress, device)
    try:
        _write_json(cached, doc)
        _write_json(cache_dir / SUMMARY_FILE, summarise(doc))
    except OSError as err:
        log.warning("could not cache the retain evaluation in %s (%s); it will be recomputed next time", cache_dir, err)
    return doc


def evaluate(model_dir: str | Path, data_dir: str | Path, forget_split: str = "forget10",
             retain_model_dir: str | Path | None = None, out_dir: str | Path | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             progress: bool = True, *, retain_out_dir: str | Path | None = None, max_items: int | None = None,
             device: str | None = None) -> dict:
    """Evaluate a saved model on TOFU; write TOFU_EVAL.json and TOFU_SUMMARY.json to `out_dir` (default model_dir).

    `retain_model_dir`: the retain model (a saved model folder, or its precomputed TOFU_EVAL.json),
    needed for forget_quality and for privleak's reference AUC; None leaves forget_quality None and
    uses AUC 0.5 for privleak. `max_items` cuts every split to its first records (smoke runs only).
    Returns the summary.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be ≥ 1 (got {batch_size}, {max_new_tokens})")
    options = EvalOptions(batch_size=batch_size, max_new_tokens=max_new_tokens)
    model_dir = Path(model_dir)
    data = load_tofu(data_dir, forget_split, max_items)
    for role in data.missing:
        log.warning("no %s split in %s: model_utility leaves its components out", role, data.data_dir)
    doc = _evaluate_dir(model_dir, data, options, progress, device)
    reference = None
    if retain_model_dir is not None:
        if Path(retain_model_dir).resolve() == model_dir.resolve():
            reference = doc  # the retain model against itself
        else:
            reference = reference_eval(retain_model_dir, data, options, progress, retain_out_dir, device)
        doc["reference"] = {"retain": str(retain_model_dir), "model": reference.get("model")}
    summary = summarise(doc, reference)
    summary["model_dir"] = str(model_dir)
    summary["retain_model_dir"] = None if retain_model_dir is None else str(retain_model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir
    _write_json(out / EVAL_FILE, doc)
    _write_json(out / SUMMARY_FILE, summary)
    log.info("TOFU evaluation written to %s", out)
    return summary
