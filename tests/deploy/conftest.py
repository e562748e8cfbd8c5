"""The real `pum` argument parser, and a checker of `pum` argument lists against it (tests/deploy)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import pytest

# The checkers live in tests/deploy/deploylint (a package, not test modules); the test modules here
# import it by name, so its folder goes on the path (pytest runs with --import-mode=importlib).
sys.path.insert(0, str(Path(__file__).parent))

from deploylint.cli import cli_problems  # noqa: E402

CheckCli = Callable[..., list[str]]  # check_cli(argv, complete=True) -> problems


@pytest.fixture(scope="session")
def parser() -> argparse.ArgumentParser:
    """The parser behind the `pum` console script."""
    from pum.cli import build_parser

    return build_parser()


@pytest.fixture(scope="session")
def check_cli(parser) -> CheckCli:
    """`check_cli(argv, complete=True)`: cli_problems against the real parser."""
    return lambda argv, complete=True: cli_problems(parser, list(argv), complete=complete)
