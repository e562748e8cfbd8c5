"""TOFU evaluation of one model, with the retain model as reference (DESIGN.md §7).

    evaluate(model_dir, data_dir, forget_split, retain_model)
        ├── load_tofu            the splits, checked and fingerprinted           (data.py)
        ├── evaluate_model       per-item values, open-unlearning's layout         (scoring.py, metrics.py, logs.py)
        ├── reference logs       the retain model's: evaluated the same way (cached in its evals/), or read from
        │                        a TOFU_EVAL.json, PUM's or open-unlearning's (its retain_logs_path)
        └── summarise            aggregates, floors marked                        (summary.py)
    out_dir/TOFU_EVAL.json     per-item values     out_dir/TOFU_SUMMARY.json   aggregates   (out_dir: MODEL/evals)
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

from pum.common.prompts import QAEncoder, check_prompt_format
from pum.common.qa import QAPair

from . import metrics
from .data import PERTURBED_ROLES, TofuData, load_tofu
from .logs import MIA_ATTACKS, PREFIX, PUM_KEY, mean_of, metric, mia_metric, truth_ratio_key
from .scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, AnswerScore, generate_answers, rouge_scores, score_answers
from .summary import check_reference, open_unlearning_summary, summarise

log = logging.getLogger(__name__)

FORMAT = 2  # bump when TOFU_EVAL.json's content changes meaning (2: open-unlearning's layout)
EVAL_FILE = "TOFU_EVAL.json"
SUMMARY_FILE = "TOFU_SUMMARY.json"
EVALS_DIR = "evals"  # open-unlearning's place for a model's evaluation: MODEL/evals/TOFU_*.json


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = DEFAULT_BATCH_SIZE  # sequences per forward pass / per generate call; no effect on values
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # greedy generation budget for ROUGE
    min_k: float = metrics.MIN_K  # fraction of tokens of min-k and min-k++
    prompt_format: str = "auto"  # chat, plain, or auto: chat when the tokenizer has a template

    def __post_init__(self):
        check_prompt_format(self.prompt_format)


def _mia_scores(score: AnswerScore, answer: str, k: float) -> dict[str, float]:
    return {"loss": metrics.mia_loss(score.avg_nll), "zlib": metrics.mia_zlib(score.avg_nll, answer),
            "min_k": metrics.mia_min_k(score.logprobs, k),
            "min_k_plus_plus": metrics.mia_min_k_plus_plus(score.logprobs, score.mu, score.sigma, k)}


def _prob(score: AnswerScore) -> dict[str, float]:
    return {"prob": score.prob, "avg_loss": score.avg_nll}


def _perturbed_logs(model, encoder, role: str, records: list[dict], options: EvalOptions,
                    progress: bool) -> tuple[dict, list[dict] | None]:
    """The metrics of one perturbed split, and (forget only) each answer's MIA scores."""
    reference_key, p = PERTURBED_ROLES[role][1], PREFIX[role]
    paraphrased = reference_key != "answer"
    pairs, spans = [], []
    for r in records:
        answers = [r["answer"]] + ([r[reference_key]] if paraphrased else []) + list(r["perturbed_answer"])
        spans.append((len(pairs), len(answers)))
        pairs.extend(QAPair(r["question"], a) for a in answers)
    scored = score_answers(model, encoder, pairs, options.batch_size, progress, desc=f"{role}: scoring")
    generations = generate_answers(model, encoder, [r["question"] for r in records], options.batch_size,
                                   options.max_new_tokens, progress, desc=f"{role}: generating")
    answer, reference, perturbed, truth, rouge, normalised, es, mia = ([] for _ in range(8))
    for r, (start, count), generation in zip(records, spans, generations):
        a = scored[start]
        ref = scored[start + 1] if paraphrased else a
        wrong = scored[start + 1 + paraphrased : start + count]
        answer.append(_prob(a))
        reference.append(_prob(ref))
        perturbed.append({"prob": [w.prob for w in wrong], "avg_loss": [w.avg_nll for w in wrong]})
        truth.append({"score": metrics.truth_ratio(ref.avg_nll, [w.avg_nll for w in wrong])})
        rouge.append({**rouge_scores(r["answer"], generation), "input": r["question"], "ground_truth": r["answer"],
                      "generation": generation})
        normalised.append({"prob": metrics.normalised_prob(a.prob, [w.prob for w in wrong])})
        if role == "forget":
            es.append({"score": metrics.extraction_strength(a.argmax_match)})
            mia.append(_mia_scores(a, r["answer"], options.min_k))
    ratio_aggregate = metrics.forget_truth_ratio if role == "forget" else metrics.utility_truth_ratio
    logs = {f"{p}_Q_A_Prob": metric(answer, mean_of("prob")), f"{p}_Q_A_PERT_Prob": metric(perturbed, mean_of("prob")),
            truth_ratio_key(role): metric(truth, lambda v: ratio_aggregate([x["score"] for x in v])),
            f"{p}_Q_A_ROUGE": metric(rouge, mean_of("rougeL_recall"))}
    if paraphrased:
        logs[f"{p}_Q_A_PARA_Prob"] = metric(reference, mean_of("prob"))
    else:  # real authors / world facts: the answer against its wrong options
        logs[f"{p}_Q_A_Prob_normalised"] = metric(normalised, mean_of("prob"))
    if role == "forget":
        logs["extraction_strength"] = metric(es, mean_of("score"))
    return logs, mia if role == "forget" else None


def _holdout_mia(model, encoder, records: list[dict], options: EvalOptions, progress: bool) -> list[dict]:
    pairs = [QAPair(r["question"], r["answer"]) for r in records]
    scored = score_answers(model, encoder, pairs, options.batch_size, progress, desc="holdout: scoring")
    return [_mia_scores(s, r["answer"], options.min_k) for r, s in zip(records, scored)]


def evaluate_model(model, tokenizer, data: TofuData, options: EvalOptions = EvalOptions(),
                   progress: bool = False) -> dict:
    """The evaluation logs (TOFU_EVAL.json's content, open-unlearning's layout) of a loaded model.

    `tokenizer` is a tokenizer (in `options.prompt_format`) or a `QAEncoder` (its own format).
    """
    encoder = tokenizer if isinstance(tokenizer, QAEncoder) else QAEncoder(tokenizer, options.prompt_format)
    logs: dict = {}
    forget_mia = None
    for role in data.records:
        if role != "holdout":
            split_logs, mia = _perturbed_logs(model, encoder, role, data.records[role], options, progress)
            logs.update(split_logs)
            forget_mia = mia if role == "forget" else forget_mia
    holdout_mia = _holdout_mia(model, encoder, data.records["holdout"], options, progress)
    for attack in MIA_ATTACKS:
        f, h = [m[attack] for m in forget_mia], [m[attack] for m in holdout_mia]
        logs[f"mia_{attack}"] = mia_metric(f, h, metrics.auc(f, h))
    logs[PUM_KEY] = {"format": FORMAT, "forget_split": data.forget_split, "holdout_split": data.holdout_split,
                     "retain_split": data.retain_split, "data_dir": str(data.data_dir), "files": data.files,
                     "digests": data.digests, "missing": data.missing, "max_items": data.max_items,
                     "options": dataclasses.asdict(options), "prompt_format": encoder.prompt_format}
    return logs


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
    logs = evaluate_model(model, tokenizer, data, options, progress)
    logs[PUM_KEY]["model"] = {"dir": str(model_dir), "stamp": model_stamp(model_dir)}
    return logs


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


def eval_file(path: str | Path) -> Path | None:
    """The TOFU_EVAL.json a path names: the file, or one in the folder or in its evals/ (None when there is none)."""
    path = Path(path)
    for candidate in (path, path / EVAL_FILE, path / EVALS_DIR / EVAL_FILE):
        if candidate.is_file():
            return candidate
    return None


def read_eval(path: str | Path) -> dict:
    """A TOFU_EVAL.json: PUM's (checked for its format) or open-unlearning's (needs forget_truth_ratio)."""
    found = eval_file(path)
    if found is None:
        raise FileNotFoundError(f"no {EVAL_FILE} at {path}")
    logs = json.loads(found.read_text(encoding="utf-8"))
    if not isinstance(logs, dict):
        raise ValueError(f"{found}: a {EVAL_FILE} holds a JSON object of metrics")
    if PUM_KEY in logs and logs[PUM_KEY].get("format") != FORMAT:
        raise ValueError(f"{found}: PUM format {logs[PUM_KEY].get('format')!r}, this code reads format {FORMAT}; "
                         "re-evaluate")
    if PUM_KEY not in logs and "forget_truth_ratio" not in logs:
        raise ValueError(f"{found}: neither PUM's nor open-unlearning's TOFU evaluation (no forget_truth_ratio)")
    return logs


def _fresh(logs: dict, data: TofuData, options: EvalOptions, stamp: str) -> bool:
    """A cached evaluation is reused only when everything that changes its values is the same."""
    pum = logs.get(PUM_KEY, {})
    return (pum.get("forget_split") == data.forget_split and pum.get("digests") == data.digests
            and pum.get("max_items") == data.max_items and pum.get("model", {}).get("stamp") == stamp
            and {k: v for k, v in pum.get("options", {}).items() if k != "batch_size"}
            == {k: v for k, v in dataclasses.asdict(options).items() if k != "batch_size"})


def _finish(logs: dict, summary: dict) -> dict:
    """Put the summary's forget quality, utility and privleak into the logs (as open-unlearning does)."""
    for name in ("forget_quality", "model_utility", "privleak"):
        logs[name] = {"agg_value": summary[name]}
    logs.setdefault(PUM_KEY, {})["summary"] = {k: v for k, v in summary.items() if k not in open_unlearning_summary(summary)}
    return logs


def _save(out: Path, logs: dict, summary: dict) -> None:
    _write_json(out / EVAL_FILE, _finish(logs, summary))
    _write_json(out / SUMMARY_FILE, open_unlearning_summary(summary))


def reference_eval(retain: str | Path, data: TofuData, options: EvalOptions, progress: bool = False,
                   retain_out_dir: str | Path | None = None, device: str | None = None) -> dict:
    """The retain model's evaluation logs, from its cache when still valid.

    `retain` is a saved model folder (its evaluation is cached in `retain_out_dir`, default
    RETAIN/evals, and reused while data, settings and weights are unchanged), or a precomputed
    TOFU_EVAL.json, PUM's or open-unlearning's (a file, or a folder holding one), used when it
    matches this evaluation's forget and holdout data.
    """
    retain = Path(retain)
    if not (retain.is_dir() and (retain / "config.json").is_file()):
        if eval_file(retain) is None:
            raise FileNotFoundError(f"{retain} is neither a saved model nor a {EVAL_FILE} (or a folder with one)")
        logs = read_eval(retain)
        probe = {PUM_KEY: {"forget_split": data.forget_split, "max_items": data.max_items, "digests": data.digests,
                           "options": dataclasses.asdict(options)},
                 "forget_truth_ratio": {"value_by_index": dict.fromkeys(map(str, range(len(data.records["forget"]))))}}
        check_reference(probe, logs)
        log.info("using the precomputed retain evaluation %s", eval_file(retain))
        return logs
    cache_dir = Path(retain_out_dir) if retain_out_dir is not None else retain / EVALS_DIR
    cached = cache_dir / EVAL_FILE
    if cached.is_file():
        try:
            logs = read_eval(cached)
            if _fresh(logs, data, options, model_stamp(retain)):
                log.info("reusing the retain model's evaluation %s", cached)
                return logs
        except (ValueError, OSError) as err:
            log.warning("ignoring the cached retain evaluation %s: %s", cached, err)
        log.info("the cached retain evaluation %s is stale; evaluating the retain model again", cached)
    logs = _evaluate_dir(retain, data, options, progress, device)
    try:
        _save(cache_dir, logs, summarise(logs))
    except OSError as err:
        log.warning("could not cache the retain evaluation in %s (%s); it will be recomputed next time", cache_dir, err)
    return logs


def evaluate(model_dir: str | Path, data_dir: str | Path, forget_split: str = "forget10",
             retain_model_dir: str | Path | None = None, out_dir: str | Path | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             progress: bool = True, *, retain_out_dir: str | Path | None = None, max_items: int | None = None,
             device: str | None = None, prompt_format: str = "auto") -> dict:
    """Evaluate a saved model on TOFU; write TOFU_EVAL.json and TOFU_SUMMARY.json to `out_dir` (default MODEL/evals).

    `retain_model_dir`: the retain model (a saved model folder, or a precomputed TOFU_EVAL.json,
    PUM's or open-unlearning's), needed for forget_quality and for privleak's reference AUC; None
    leaves forget_quality None and uses AUC 0.5 for privleak. `max_items` cuts every split to its
    first records (smoke runs only). `prompt_format`: chat, plain or auto (chat when the tokenizer
    has a template). Returns the summary: open-unlearning's aggregates plus PUM's notes.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be ≥ 1 (got {batch_size}, {max_new_tokens})")
    options = EvalOptions(batch_size=batch_size, max_new_tokens=max_new_tokens, prompt_format=prompt_format)
    model_dir = Path(model_dir)
    data = load_tofu(data_dir, forget_split, max_items)
    for role in data.missing:
        log.warning("no %s split in %s: model_utility leaves its components out", role, data.data_dir)
    logs = _evaluate_dir(model_dir, data, options, progress, device)
    reference = None
    if retain_model_dir is not None:
        if Path(retain_model_dir).resolve() == model_dir.resolve():
            reference = logs  # the retain model against itself
        else:
            reference = reference_eval(retain_model_dir, data, options, progress, retain_out_dir, device)
        logs[PUM_KEY]["reference"] = {"retain": str(retain_model_dir),
                                      "model": reference.get(PUM_KEY, {}).get("model")}
    summary = summarise(logs, reference)
    summary["model_dir"] = str(model_dir)
    summary["retain_model_dir"] = None if retain_model_dir is None else str(retain_model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir / EVALS_DIR
    _save(out, logs, summary)
    log.info("TOFU evaluation written to %s", out)
    return summary
