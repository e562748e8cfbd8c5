"""`pum eval MODEL --data DIR --forget-split forget10 --retain-model DIR`: TOFU metrics of a saved model.

MODEL and --retain-model are folders or Hugging Face ids in the local cache; --data is a TOFU folder
or the dataset id `locuslab/TOFU` in the local cache. The evaluation goes to MODEL/evals/ as
open-unlearning writes it (TOFU_EVAL.json, TOFU_SUMMARY.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pum.common.prompts import PROMPT_FORMATS

from .data import SPLITS
from .scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS

HEADLINE = ("forget_quality", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility",
            "privleak", "extraction_strength", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="TOFU metrics of a saved model (forget quality, utility, privleak, MIA)")
    parser.add_argument("model_dir", help="the model to evaluate: a save_pretrained folder, or a Hugging Face id in the local cache")
    parser.add_argument("--data", required=True,
                        help="TOFU splits: a folder (JSON lines, or the datasets library's save_to_disk folders), "
                             "or locuslab/TOFU in the local Hugging Face cache")
    parser.add_argument("--forget-split", default="forget10", choices=sorted(SPLITS), help="TOFU forget split (default forget10)")
    parser.add_argument("--retain-model", default=None,
                        help="retain model (folder or cached Hugging Face id), or its TOFU_EVAL.json, PUM's or "
                             "open-unlearning's (retain_logs_path); needed for forget_quality and privleak")
    parser.add_argument("--retain-out", type=Path, default=None,
                        help="where the retain model's evaluation is cached (default: RETAIN/evals)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where TOFU_EVAL.json and TOFU_SUMMARY.json go (default MODEL/evals)")
    parser.add_argument("--prompt-format", default="auto", choices=PROMPT_FORMATS,
                        help="chat: the tokenizer's chat template (open-unlearning's TOFU prompt); plain: "
                             "'Question: …\\nAnswer:'; auto (default): chat when the tokenizer has a template")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"evaluation batch size (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"longest generated answer, in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--max-items", type=int, default=None, help="first N records of each split (smoke runs)")
    parser.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    parser.set_defaults(run=run)


def format_summary(summary: dict) -> str:
    """The headline metrics, one per line, then the notes."""
    lines = [f"TOFU {summary['forget_split']}: {summary['n_forget']} forget / {summary['n_holdout']} holdout questions"]
    for key in HEADLINE:
        value = summary.get(key)
        text = "n/a" if value is None else f"{value:.4g}"
        if key == "forget_quality" and summary.get("forget_quality_is_floor"):
            text += " (floor: fully separated)"
        if key == "model_utility" and summary.get("model_utility_partial"):
            text += f" (partial: without {', '.join(summary['model_utility_missing'])})"
        lines.append(f"  {key:<22} {text}")
    lines.extend(f"  note: {note}" for note in summary.get("notes", []))
    return "\n".join(lines)


def retain_source(name: str) -> Path:
    """--retain-model: a model folder, a TOFU_EVAL.json (or a folder with one), or a cached Hugging Face id."""
    from pum.common.hub import resolve_local

    from .tofu import eval_file

    path = Path(name).expanduser()
    return path if path.is_dir() or eval_file(path) is not None else resolve_local(name, "--retain-model")


def evals_dir(given: str, model_dir: Path) -> Path:
    """MODEL/evals for a folder; saves/eval/<org>_<name>/ for a model read from the Hugging Face cache
    (PUM never writes into the cache)."""
    from .tofu import EVALS_DIR

    if Path(given).expanduser().is_dir():
        return model_dir / EVALS_DIR
    return Path("saves") / "eval" / given.replace("/", "_")


def run(args: argparse.Namespace) -> int:
    from pum.common.hub import resolve_local

    from .data import resolve_data
    from .tofu import SUMMARY_FILE, evaluate

    model_dir = resolve_local(args.model_dir, "model")
    retain = retain_source(args.retain_model) if args.retain_model is not None else None
    out = args.out if args.out is not None else evals_dir(args.model_dir, model_dir)
    retain_out = args.retain_out
    if retain_out is None and retain is not None and not Path(args.retain_model).expanduser().exists():
        retain_out = evals_dir(args.retain_model, retain)
    summary = evaluate(model_dir, resolve_data(args.data), args.forget_split, retain, out,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       progress=not args.no_progress, retain_out_dir=retain_out, max_items=args.max_items,
                       device=args.device, prompt_format=args.prompt_format)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    print(f"\nwritten: {out / SUMMARY_FILE}")
    return 0
