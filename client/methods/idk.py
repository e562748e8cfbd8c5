"""The "I don't know" answers that DPO (IdkDPO) prefers over the forget answers.

`idontknow.txt`, shipped in this package, is TOFU's `data/idontknow.jsonl` (locuslab/tofu, MIT
licence; Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs"): plain text, one
refusal per line, despite the original's `.jsonl` name. A worker may replace the list with its own
file (`load_idk_answers(path)`), passed to `run_unlearning(..., idk_answers=...)`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

PACKAGED_FILE = "idontknow.txt"


def parse_idk_lines(text: str, source: str = "idk answers") -> tuple[str, ...]:
    """The non-blank lines of `text`, stripped; ValueError if there are none."""
    answers = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not answers:
        raise ValueError(f"{source}: no answers (expected one \"I don't know\" line per line)")
    return answers


@functools.lru_cache(maxsize=1)
def _packaged() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath(PACKAGED_FILE).read_text(encoding="utf-8")
    return parse_idk_lines(text, PACKAGED_FILE)


def load_idk_answers(path: str | Path | None = None) -> tuple[str, ...]:
    """The "I don't know" answers: the packaged TOFU list, or the lines of a text file at `path`."""
    if path is None:
        return _packaged()
    return parse_idk_lines(Path(path).read_text(encoding="utf-8"), str(path))


def check_idk_answers(answers: Sequence[str]) -> tuple[str, ...]:
    """`answers` as a tuple; ValueError if it is a bare string, empty, or holds a blank or non-string entry."""
    if isinstance(answers, str):
        raise ValueError("idk_answers must be a sequence of answers, not one string")
    answers = tuple(answers)
    if not answers:
        raise ValueError("idk_answers is empty: give at least one \"I don't know\" answer")
    bad = [a for a in answers if not isinstance(a, str) or not a.strip()]
    if bad:
        raise ValueError(f"idk_answers must be non-blank strings (got {bad[0]!r})")
    return answers


def choose_idk(n: int, n_answers: int, generator: torch.Generator | None = None) -> list[int]:
    """Indices of the idk answer for each of `n` questions, uniform with replacement.

    Deterministic given the generator's state; without one, a generator seeded with 0.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return torch.randint(n_answers, (n,), generator=generator).tolist()
