"""bench/lease_latency.py runs to its figures on a small setting (a real server process: e2e).

The benchmark is run by hand for its numbers; this keeps it runnable as the server's rules change
(a job of at most 64 copies, give-backs that count as failures of the copy broke it once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_the_lease_latency_benchmark_prints_both_phases_and_merges_uploads():
    command = [sys.executable, str(REPO / "bench" / "lease_latency.py"), "--uploads", "2", "--rate", "0",
               "--probes", "20", "--interval", "0.1", "--target-ms", "10000"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["idle"]["n"] == result["busy"]["n"] == 20
    assert result["uploads_merged_during_probes"] > 0 and result["uploads_refused"] == 0
    assert result["accepted"] > 0 and result["ok"]
