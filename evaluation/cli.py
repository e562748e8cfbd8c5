"""`pum eval MODEL_DIR --data DIR --forget-split forget10 --retain-model DIR`: TOFU metrics of a saved model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .data import SPLITS
from .scoring import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS

HEADLINE = ("forget_quality", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility",
            "privleak", "extraction_strength", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="TOFU metrics of a saved model (forget quality, utility, privleak, MIA)")
    parser.add_argument("model_dir", type=Path, help="the model to evaluate (a save_pretrained folder with its tokenizer)")
    parser.add_argument("--data", type=Path, required=True, help="folder of TOFU JSON-lines splits")
    parser.add_argument("--forget-split", default="forget10", choices=sorted(SPLITS), help="TOFU forget split (default forget10)")
    parser.add_argument("--retain-model", type=Path, default=None,
                        help="retain model folder (or its TOFU_EVAL.json); needed for forget_quality and privleak")
    parser.add_argument("--retain-out", type=Path, default=None,
                        help="where the retain model's evaluation is cached (default: the retain model folder)")
    parser.add_argument("--out", type=Path, default=None, help="where TOFU_EVAL.json and TOFU_SUMMARY.json go (default MODEL_DIR)")
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


def run(args: argparse.Namespace) -> int:
    from .tofu import SUMMARY_FILE, evaluate

    summary = evaluate(args.model_dir, args.data, args.forget_split, args.retain_model, args.out,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       progress=not args.no_progress, retain_out_dir=args.retain_out, max_items=args.max_items,
                       device=args.device)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    print(f"\nwritten: {(args.out or args.model_dir) / SUMMARY_FILE}")
    return 0
