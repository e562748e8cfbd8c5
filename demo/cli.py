"""`pum demo`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    from .runner import DemoOptions

    defaults = DemoOptions()
    parser = subparsers.add_parser("demo", help="offline end-to-end demo on a tiny model: baseline vs PUM")
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir,
                        help=f"summary, logs, server state and merged model (default {defaults.out_dir})")
    parser.add_argument("--cache-dir", type=Path, default=None, help="demo assets cache (default ~/.cache/pum)")
    parser.add_argument("--method", default=defaults.method, help=f"inner unlearning method (default {defaults.method})")
    parser.add_argument("--copies", type=int, default=defaults.copies_m, help="copies m per round")
    parser.add_argument("--rounds", type=int, default=defaults.rounds_R, help="rounds R")
    parser.add_argument("--kappa", type=float, default=defaults.noise_kappa, help="relative noise level κ")
    parser.add_argument("--jitter-tau", type=float, default=defaults.jitter_tau,
                        help="jitter τ: independent noise per copy that does not cancel in the merge (default 0)")
    parser.add_argument("--epochs", type=float, default=defaults.epochs,
                        help="the baseline's epochs; PUM splits them over the rounds")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"learning rate (default {defaults.lr:g})")
    parser.add_argument("--workers", type=int, default=defaults.workers, help=f"worker processes (default {defaults.workers})")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads of the demo process")
    parser.add_argument("--dp-epsilon", type=float, default=None,
                        help="DP noise for this ε (δ = 1e-5) instead of --kappa (center clipped around the initialisation)")
    parser.add_argument("--dp-target", choices=["true_release", "seed_formula"], default=None,
                        help="what --dp-epsilon bounds (default: true_release for zero-sum noise)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .runner import DemoOptions, format_table, run_demo

    options = DemoOptions(
        out_dir=args.out_dir, cache_dir=args.cache_dir, method=args.method, copies_m=args.copies,
        rounds_R=args.rounds, noise_kappa=args.kappa, epochs=args.epochs, lr=args.lr, workers=args.workers,
        threads=args.threads, dp_epsilon=args.dp_epsilon, dp_target=args.dp_target, jitter_tau=args.jitter_tau,
    )
    summary = run_demo(options)
    print(format_table(summary))
    print(f"\nwritten: {options.out_dir / 'summary.json'}")
    return 0 if summary["checks"]["forget_drop_ok"] and summary["checks"]["retain_gap_ok"] else 1
