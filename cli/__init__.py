"""The `pum` console script: `pum server`, `pum worker`, `pum admin …`, `pum unlearn`, `pum demo`, `pum eval`."""

from __future__ import annotations

import argparse
import logging
import sys

from pum.common.errors import PumError


def build_parser() -> argparse.ArgumentParser:
    from pum.client.cli import add_parsers as add_client
    from pum.demo.cli import add_parser as add_demo
    from pum.evaluation.cli import add_parser as add_eval
    from pum.server.cli import add_parser as add_server
    from pum.server.cli import add_privacy_parser

    parser = argparse.ArgumentParser(prog="pum", description="Perturb–Unlearn–Merge federated unlearning")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    subparsers = parser.add_subparsers(dest="role", required=True)
    add_server(subparsers)
    add_client(subparsers)
    add_demo(subparsers)
    add_eval(subparsers)
    add_privacy_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress
    try:
        return args.run(args) or 0
    except (PumError, ValueError, FileNotFoundError, TimeoutError) as err:
        print(f"pum {args.role}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
