"""What a person watching the CLI sees: byte bars with a total and an ETA, and a job's progress while
`pum admin wait` waits."""

from __future__ import annotations

from typing import Callable, TextIO

from tqdm import tqdm

from pum.common.schemas import JobStatus

BarFactory = Callable[[str, "int | None"], tqdm]  # (description, total bytes or None) -> a bar


def byte_bar(desc: str, total: int | None, enabled: bool = True) -> tqdm:
    """A bar over bytes: with a total, tqdm shows the percentage, the rate and the ETA."""
    return tqdm(desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)


def set_total(bar: tqdm, total: int) -> None:
    """Give a bar its total once the size is known (the Content-Length of a download), before any byte."""
    bar.reset(total=total)


def job_progress(status: JobStatus) -> str:
    """One line of a job's status: state, round r/R and the copies accepted in the current round."""
    line = f"job {status.id} {status.state}"
    current = next((r for r in status.rounds if r.round == status.round), status.rounds[-1] if status.rounds else None)
    if status.round:
        line += f": round {status.round}/{status.rounds_R}"
        if current is not None:
            line += f", copies accepted {current.accepted}/{status.copies_m}"
    if status.error:
        line += f" ({status.error})"
    return line


class WaitProgress:
    """`on_status` of AdminAPI.wait: writes the job's progress line to `out` each time it changes."""

    def __init__(self, out: TextIO):
        self.out = out
        self.last: str | None = None

    def __call__(self, status: JobStatus) -> None:
        line = job_progress(status)
        if line != self.last:
            print(line, file=self.out, flush=True)
            self.last = line
