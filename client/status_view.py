"""`pum admin status` and `watch` for people: a job as a short table (durations, workers, failures, ε).

    job job-1a2b3c (task demo): running, round 1/2
    copies 3/8 accepted · 12.0 copies/h · running 15m 00s · ETA 25m 00s · copy 1.2 MiB
    privacy: ε = 3.21 (true ε of the release against the largest party …)
    round 1  open  3/4 accepted  15m 00s
      copy  state     worker  held     leases  ended without upload
      0     accepted  gpu0    4m 10s   1
      1     leased    gpu1    2m 02s   2       expired 1

One line per copy: m = 4, R = 2 fits in 20 lines. `--json` gives the whole document instead.
"""

from __future__ import annotations

import time
from typing import Callable, TextIO

from pum.common.schemas import CopyInfo, JobStatus, PrivacyReport, RoundInfo
from pum.common.states import END_STATES

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: a terminal shows one table at a time


def duration(seconds: float | None) -> str:
    """12s, 3m 07s, 2h 05m, 3d 04h; '-' for None."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def privacy_line(report: PrivacyReport | None) -> str:
    if report is None:
        return "privacy: no report"
    if report.epsilon is None:
        reason = report.no_epsilon_reasons[0] if report.no_epsilon_reasons else "not computed"
        reason = reason if len(reason) <= 100 else reason[:99] + "…"  # the whole reason: --json or /privacy
        return f"privacy: no ε ({reason})"
    epsilon = "∞ (unbounded)" if report.epsilon == "inf" else f"{report.epsilon:.3g}"
    return f"privacy: ε = {epsilon}, δ = {report.delta:g} ({report.headline})"


def ends(copy: CopyInfo) -> str:
    return ", ".join(f"{how} {n}" for how, n in sorted(copy.lease_ends.items()))


def round_lines(rnd: RoundInfo, m: int) -> list[str]:
    lines = [f"round {rnd.round}  {rnd.state}  {rnd.accepted}/{m} accepted  {duration(rnd.seconds)}"]
    rows = [("copy", "state", "worker", "held", "leases", "ended without upload")]
    rows += [(str(c.k), str(c.state), c.worker or "-", duration(c.seconds), str(c.leases), ends(c)) for c in rnd.copies]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def status_table(status: JobStatus, report: PrivacyReport | None) -> str:
    """The job as a person reads it: its state and round, progress and ETA, ε, each round's copies."""
    head = f"job {status.id} (task {status.task}): {status.state}"
    if status.round:
        head += f", round {status.round}/{status.rounds_R}"
    lines = [head]
    if status.error:
        lines.append(f"error: {status.error}")
    p = status.progress
    if p is not None:
        rate = f"{p.copies_per_hour:.1f} copies/h" if p.copies_per_hour else "no copy yet"
        verb = "ran" if status.state in END_STATES else "running"
        line = f"copies {p.copies_accepted}/{p.copies_total} accepted · {rate} · {verb} {duration(p.seconds)}"
        if p.eta_s is not None:
            line += f" · ETA {duration(p.eta_s)}"
        if p.copy_bytes is not None:
            line += f" · copy {size(p.copy_bytes)}"
        lines.append(line)
    lines.append(privacy_line(report))
    if status.output_dir:
        lines.append(f"merged model: {status.output_dir}")
    for rnd in status.rounds:
        lines += round_lines(rnd, status.copies_m)
    return "\n".join(lines)


def watch(read: Callable[[], tuple[JobStatus, PrivacyReport | None]], out: TextIO, interval_s: float = 2.0,
          count: int | None = None, clear: bool = True, sleep: Callable[[float], None] = time.sleep) -> JobStatus:
    """Show the table every `interval_s` until the job ends (or after `count` tables); the last status."""
    shown = 0
    while True:
        status, report = read()
        out.write((CLEAR if clear else "") + status_table(status, report) + "\n")
        out.flush()
        shown += 1
        if status.state in END_STATES or (count is not None and shown >= count):
            return status
        sleep(interval_s)
