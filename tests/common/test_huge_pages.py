"""Large tensors of the `pum` processes lie on transparent huge pages (pum.common.huge_pages)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pum.common.huge_pages import VARIABLE, prefer_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# after `pum --version` has run in this process, how much of a fresh 64 MiB tensor lies on huge pages
PROBE = """
import re
from pum.cli import main
try:
    main(["--version"])
except SystemExit:
    pass
import torch
tensor = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
rollup = open("/proc/self/smaps_rollup").read()
print("huge", int(re.search(r"AnonHugePages:\\s+(\\d+) kB", rollup).group(1)) * 1024)
"""


def thp_mode() -> str | None:
    """The kernel's setting: always, madvise or never (None: no THP here)."""
    if not THP.is_file():
        return None
    return re.search(r"\[(\w+)\]", THP.read_text()).group(1)


def huge_bytes_after_pum(environ: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split("huge", 1)[1])


def test_the_setting_is_a_default_the_environment_overrides():
    environ: dict[str, str] = {}
    prefer_huge_pages(environ)
    assert environ == {VARIABLE: "1"}
    environ = {VARIABLE: "0"}
    prefer_huge_pages(environ)
    assert environ == {VARIABLE: "0"}


@pytest.mark.e2e  # two `pum` processes
@pytest.mark.skipif(thp_mode() != "madvise", reason="the kernel must give huge pages only when asked (madvise)")
def test_a_pum_process_puts_large_tensors_on_huge_pages_unless_told_not_to():
    environ = {k: v for k, v in os.environ.items() if k != VARIABLE}
    assert huge_bytes_after_pum(environ) >= 32 << 20  # most of the 64 MiB (the ends need not be aligned)
    assert huge_bytes_after_pum({**environ, VARIABLE: "0"}) == 0
