"""Large tensors on transparent huge pages (2 MiB) instead of 4 KiB pages.

The kernel maps a fresh tensor's memory one page at a time, at its first write. On this project's
virtual machines a 4 KiB fault costs microseconds, so writing a new 128 MiB tensor (a 7B model's
embedding is 0.5–1 GiB) spent more time faulting pages in than on the work: filling fresh tensors
ran at 0.3 G floats/s with 4 KiB pages and 1.4 G floats/s with huge pages, in one run here. The
server and the workers make model-sized tensors all the time (a copy's noise, each tensor read from
disk, each uploaded tensor): in a round of bench/round_throughput.py at 27 M parameters (m = 4),
huge pages took the server's system time from 2.8–3.1 s to 1.6 s and the round from 5.0–5.5 s to
3.8–4.2 s (three rounds each, alternated). At 196 M the round is bound by the disk and the copies'
bytes, and changed by 2–3 %.

PyTorch's CPU allocator aligns allocations of 2 MiB and more to 2 MiB and advises the kernel to back
them with huge pages when THP_MEM_ALLOC_ENABLE=1. It reads the variable once, at its first
allocation, so it is set before any tensor exists. The kernel must allow it
(/sys/kernel/mm/transparent_hugepage/enabled: `always` or `madvise`); where it does not, nothing changes.
"""

from __future__ import annotations

import os
from typing import MutableMapping

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages(environ: MutableMapping[str, str] = os.environ) -> None:
    """Ask PyTorch for huge pages, unless the environment already says (THP_MEM_ALLOC_ENABLE=0 turns them off)."""
    environ.setdefault(VARIABLE, "1")
