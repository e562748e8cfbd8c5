"""Benchmark: latency of the lease call (and of heartbeats) with N workers hammering one server.

Starts a real `pum server` on 127.0.0.1 over a tiny Llama (about 6 k parameters, so the copies and
deltas cost next to nothing and the figures are those of the lease machinery: HTTP, the SQLite
store, the lease table), creates a job of m copies and R rounds and runs N worker threads, each
with its own `httpx.Client` and worker token: lease → H heartbeats → upload a fixed float32
delta → lease again; a "wait" answer is retried after --poll seconds. Runs until the job is
finalized or --max-seconds. Prints p50/p99/max of each call and the throughput, then one JSON
object as the last line.

    python bench/lease_concurrency.py [--workers 64] [--copies 64] [--rounds 4] [--heartbeats 2]
                                      [--poll 0.02] [--max-seconds 120] [--download]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import save

from pum.common.codec import SafetensorsFile
from pum.demo.cluster import LocalServer
from pum.demo.tiny_model import build_model, tiny_llama_config

log = logging.getLogger("bench.lease_concurrency")


class Timings:
    """Latencies in seconds per call kind, from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, kind: str, seconds: float, status: int) -> None:
        with self._lock:
            self.samples[kind].append(seconds)
            self.statuses[kind][status] += 1

    def summary(self, kind: str) -> dict:
        values = np.array(self.samples.get(kind, []), dtype=np.float64) * 1000.0
        if not len(values):
            return {"n": 0}
        return {"n": int(len(values)), "p50_ms": round(float(np.percentile(values, 50)), 2),
                "p99_ms": round(float(np.percentile(values, 99)), 2), "max_ms": round(float(values.max()), 2),
                "mean_ms": round(float(values.mean()), 2)}


def tiny_model(folder: Path) -> Path:
    config = tiny_llama_config(vocab_size=64, hidden=16, layers=2, heads=2, intermediate=32)
    build_model(config, seed=0).to(torch.float32).save_pretrained(folder, safe_serialization=True)
    return folder


def fixed_delta(model_dir: Path) -> bytes:
    with SafetensorsFile(model_dir / "model.safetensors") as weights:
        return save({i.name: torch.full(tuple(i.shape), 1e-4, dtype=torch.float32) for i in weights.infos})


def worker(url: str, token: str, delta: bytes, args: argparse.Namespace, timings: Timings, stop_at: float,
           errors: list[str], name: str) -> None:
    """Lease, heartbeat, (download,) upload; until the job is done or the time is up."""
    def timed(kind: str, call) -> httpx.Response:
        started = time.perf_counter()
        response = call()
        response.elapsed_s = time.perf_counter() - started
        timings.add(kind, response.elapsed_s, response.status_code)
        return response

    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0) as http:
            while time.monotonic() < stop_at:
                response = timed("lease", lambda: http.post("/v1/work/lease"))
                reply = response.json()
                timings.add(f"lease_{reply.get('status', 'error')}", response.elapsed_s, response.status_code)
                if reply.get("status") == "done":
                    return
                if reply.get("status") != "leased":
                    time.sleep(args.poll)
                    continue
                lease_id = reply["lease_id"]
                for _ in range(args.heartbeats):
                    timed("heartbeat", lambda: http.post(f"/v1/work/leases/{lease_id}/heartbeat"))
                if args.download:
                    timed("copy", lambda: http.get(f"/v1/work/leases/{lease_id}/copy"))
                timed("upload", lambda: http.put(f"/v1/work/leases/{lease_id}/delta", content=delta))
    except Exception as err:  # counted and reported by main
        errors.append(f"{name}: {type(err).__name__}: {err}")


def run(args: argparse.Namespace, tmp: Path) -> dict:
    model_dir = tiny_model(tmp / "model")
    delta = fixed_delta(model_dir)
    server = LocalServer(tmp / "state", tmp / "saves", lease_ttl_s=args.ttl, log_path=tmp / "server.log", dev=True)
    timings, errors = Timings(), []
    with server, httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"},
                              timeout=60.0) as admin:
        pum = {"copies_m": args.copies, "rounds_R": args.rounds, "noise_kappa": 0.01, "seed": 0}
        job = admin.post("/v1/jobs", json={"task": "bench-lease", "model_dir": str(model_dir), "pum": pum,
                                           "hyperparams": {}}).raise_for_status().json()["id"]
        tokens = [admin.post(f"/v1/jobs/{job}/tokens", json={"label": f"bench-{i}"}).raise_for_status().json()["token"]
                  for i in range(args.workers)]
        admin.post(f"/v1/jobs/{job}/start").raise_for_status()
        started = time.monotonic()
        stop_at = started + args.max_seconds
        threads = [threading.Thread(target=worker, args=(server.url, t, delta, args, timings, stop_at, errors, f"w{i}"))
                   for i, t in enumerate(tokens)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, stop_at + 60 - time.monotonic()))
        wall = time.monotonic() - started
        status = admin.get(f"/v1/jobs/{job}").raise_for_status().json()
    requests = sum(len(v) for k, v in timings.samples.items() if not k.startswith("lease_"))
    uploads_ok = timings.statuses["upload"].get(200, 0)
    return {
        "workers": args.workers, "copies_m": args.copies, "rounds_R": args.rounds, "heartbeats": args.heartbeats,
        "poll_s": args.poll, "download": args.download, "job_state": status["state"],
        "accepted": [r["accepted"] for r in status["rounds"]], "wall_s": round(wall, 2),
        "lease": timings.summary("lease"), "lease_granted": timings.summary("lease_leased"),
        "lease_wait": timings.summary("lease_wait"), "heartbeat": timings.summary("heartbeat"),
        "upload": timings.summary("upload"), "copy": timings.summary("copy"),
        "requests_per_s": round(requests / wall, 1), "leases_granted_per_s": round(len(timings.samples["lease_leased"]) / wall, 1),
        "copies_merged_per_s": round(uploads_ok / wall, 1),
        "statuses": {k: dict(v) for k, v in timings.statuses.items() if not k.startswith("lease_")},
        "errors": len(errors), "first_errors": errors[:3],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=64, help="concurrent worker threads (default 64)")
    parser.add_argument("--copies", type=int, default=64, help="copies m per round (default 64)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds R (default 4)")
    parser.add_argument("--heartbeats", type=int, default=2, help="heartbeats per lease (default 2)")
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between lease tries on 'wait' (default 0.02)")
    parser.add_argument("--ttl", type=float, default=30.0, help="lease TTL in seconds (default 30)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop the workers after this long (default 120)")
    parser.add_argument("--download", action="store_true", help="also download each copy")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.copies < 2 or args.rounds < 1:
        parser.error("--workers ≥ 1, --copies ≥ 2 and --rounds ≥ 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="pum-bench-lease-") as tmp:
        result = run(args, Path(tmp))
    print(f"{args.workers} workers, m = {args.copies}, R = {args.rounds}: job {result['job_state']} "
          f"in {result['wall_s']} s, accepted per round {result['accepted']}")
    for kind in ("lease", "lease_granted", "lease_wait", "heartbeat", "upload", "copy"):
        s = result[kind]
        if s["n"]:
            print(f"  {kind:14s} n={s['n']:6d}  p50 {s['p50_ms']:8.2f} ms  p99 {s['p99_ms']:8.2f} ms  max {s['max_ms']:8.2f} ms")
    print(f"  throughput: {result['requests_per_s']} requests/s, {result['leases_granted_per_s']} leases granted/s, "
          f"{result['copies_merged_per_s']} copies merged/s; errors {result['errors']}")
    print(json.dumps(result))
    return 0 if result["job_state"] == "finalized" and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
