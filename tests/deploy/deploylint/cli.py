"""`pum` argument lists (from scripts, compose files, Dockerfiles, docs) checked against the real parser."""

from __future__ import annotations

import argparse
import contextlib
import io


def _positionals(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not a.option_strings]


def cli_problems(parser: argparse.ArgumentParser, argv: list[str], *, complete: bool = True) -> list[str]:
    """What is wrong with `pum ARGV`.

    Walks the subparsers: each subcommand and flag must exist, under its exact name (argparse
    also takes unambiguous abbreviations, which break once a longer flag is added) and at the
    level where it is given. With `complete`, argparse itself must accept the whole line too
    (required flags present, values of the right type).
    """
    problems, where, current = [], ["pum"], parser
    positionals, i = _positionals(parser), 0
    while i < len(argv):
        token, i = argv[i], i + 1
        if token.startswith("-") and token != "-":
            flag = token.split("=", 1)[0]
            action = current._option_string_actions.get(flag)
            if action is None:
                known = ", ".join(sorted(s for s in current._option_string_actions if s.startswith("--")))
                problems.append(f"`{' '.join(where)}` has no flag {flag} (known: {known})")
            elif action.nargs != 0 and "=" not in token:
                i += 1  # its value
            continue
        if not positionals:
            problems.append(f"`{' '.join(where)}` takes no argument {token!r}")
            continue
        action = positionals.pop(0)
        if isinstance(action, argparse._SubParsersAction):
            if token not in action.choices:
                problems.append(f"`{' '.join(where)}` has no subcommand {token!r} (known: {', '.join(action.choices)})")
                return problems
            current, positionals = action.choices[token], _positionals(action.choices[token])
            where.append(token)
    if complete and not problems:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                _, unknown = parser.parse_known_args(argv)
        except SystemExit:
            problems.append(f"argparse refuses `pum {' '.join(argv)}`: {err.getvalue().strip().splitlines()[-1]}")
        else:
            if unknown:
                problems.append(f"argparse leaves {unknown} of `pum {' '.join(argv)}` unparsed")
    return problems
