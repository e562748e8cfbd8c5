"""The `pum` console script: `pum server`, `pum worker`, `pum admin …`, `pum unlearn`, `pum demo`, `pum eval`."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from pum.common.errors import PumError
from pum.common.huge_pages import prefer_huge_pages
from pum.common.logs import LOG_FORMATS
from pum.common.logs import configure as configure_logs

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_LEVEL_HELP = "log verbosity: DEBUG, INFO, WARNING or ERROR (default INFO); accepted before or after the subcommand"
LOG_FORMAT_HELP = ("text, or json: one JSON object per line with job, round, copy, lease, worker, bytes, seconds "
                   "where they apply (or PUM_LOG_FORMAT; default text); accepted before or after the subcommand")
EPILOG = ("exit status: 0 done, 2 bad input or refused by the server, 3 server unreachable, "
          "4 the job waited for failed or was aborted (pum admin wait)")


def version() -> str:
    try:
        return metadata.version("pum-unlearn")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from pum.client.cli import add_parsers as add_client
    from pum.demo.cli import add_parser as add_demo
    from pum.evaluation.cli import add_parser as add_eval
    from pum.server.cli import add_parser as add_server
    from pum.server.cli import add_privacy_parser

    parser = argparse.ArgumentParser(prog="pum", description="Perturb–Unlearn–Merge federated unlearning", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"pum {version()}", help="print the version and exit")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", help=LOG_LEVEL_HELP)
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=os.environ.get("PUM_LOG_FORMAT", "text"),
                        help=LOG_FORMAT_HELP)
    subparsers = parser.add_subparsers(dest="role", required=True)
    add_server(subparsers)
    add_client(subparsers)
    add_demo(subparsers)
    add_eval(subparsers)
    add_privacy_parser(subparsers)
    for sub in subcommand_parsers(parser):
        # SUPPRESS: a subcommand that is not given --log-level leaves the top-level value alone.
        sub.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=argparse.SUPPRESS, help=LOG_LEVEL_HELP)
        sub.add_argument("--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS, help=LOG_FORMAT_HELP)
    return parser


def subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser` (`pum admin`, `pum admin wait`, ...), depth first."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += [sub, *subcommand_parsers(sub)]
    return found


def unreachable(err: Exception, server: str | None) -> str:
    """One line for a server that cannot be reached: where, why, and what to check."""
    import httpx

    try:
        url = server or str(err.request.url.copy_with(path="/", query=None))
    except RuntimeError:  # an error raised outside a request
        url = server or "the server"
    reason = str(err) or type(err).__name__
    if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate verify failed" in reason:
        hint = "the server's certificate is not trusted here: give --ca-file with the CA that signed it"
    elif isinstance(err, httpx.TimeoutException):
        hint = "the server did not answer in time: check that it runs, and the network or firewall between"
    else:
        hint = "check the URL (--server or PUM_SERVER_URL), that `pum server` runs there, and its --host/--port"
    return f"cannot reach {url} ({reason}): {hint}"


def main(argv: list[str] | None = None) -> int:
    prefer_huge_pages()  # before any tensor exists: PyTorch reads it once
    import httpx

    args = build_parser().parse_args(argv)
    configure_logs(args.log_level, args.log_format)
    try:
        return args.run(args) or 0
    except (PumError, ValueError, FileNotFoundError, TimeoutError) as err:
        print(f"pum {args.role}: {err}", file=sys.stderr)
        return 2
    except httpx.TransportError as err:  # connect, TLS, timeouts, cut connections: no traceback
        print(f"pum {args.role}: {unreachable(err, getattr(args, 'server', None))}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
