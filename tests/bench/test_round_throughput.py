"""bench/round_throughput.py runs both rounds to their figures on a 1 M-parameter model (a real
`pum server` and the baseline's own server process: e2e).

The benchmark is run by hand for its numbers; this keeps it runnable as the server changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_the_round_throughput_benchmark_times_both_servers_and_projects(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "round_throughput.py"), "--sizes", "1m", "--workers", "2",
               "--copies", "2", "--cache-dir", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    (row,) = result["rounds"]
    assert row["size"] == "1m" and 1e6 < row["params"] < 2e6
    assert row["pum_s"] > 0 and row["plain_s"] > 0 and row["ratio"] == pytest.approx(row["pum_s"] / row["plain_s"])
    assert row["moved_gb"] == pytest.approx(2 * 2 * 4 * row["params"] / 1e9)  # 2 workers, a float32 copy each way
    assert result["disk_write_gb_s"] > 0 and result["loopback_tcp_gb_s"] > 0 and result["rng_floats_per_s"] > 0
    seven_b = result["projection"]["7B"]
    assert seven_b["download_gb_per_copy"] == seven_b["upload_gb_per_copy"] == pytest.approx(13.48)  # bf16
    assert set(seven_b["round_s"]) == {"1gbit_s", "10gbit_s", "25gbit_s"}
