"""Benchmark: lease-request latency while uploads are in flight, against the same server idle.

Starts a real `pum server` (uvicorn) on 127.0.0.1 over a ~3.5 M-parameter Llama (a 14 MB float32
delta per upload) and a job whose copies outlast the run: the largest m and R a job may have (64 copies
a round, 100 rounds, independent noise: no z̄ to draw), so rounds complete and step under the load.
Phase 1, idle: a probe asks for a lease and the admin revokes it, --probes times, and times the lease
call only. Phase 2: a separate process keeps --uploads uploads in flight (each thread leases a
copy and uploads the fixed delta, again and again, at --rate MB/s like a worker's network link;
--rate 0 sends as fast as loopback goes, which saturates this machine's two cores and its disk)
while the probe repeats phase 1. Prints p50/p99/max of both phases, how many uploads were in
flight at each probe and how many merged, then one JSON object as the last line. Exit code 0
when the busy p99 is within --target-ms.

    python bench/lease_latency.py [--uploads 16] [--rate 2] [--probes 300] [--interval 0.05]
                                  [--target-ms 50] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import save

from pum.common.codec import SafetensorsFile
from pum.common.settings import MAX_COPIES, MAX_ROUNDS
from pum.demo.cluster import LocalServer
from pum.demo.tiny_model import build_model, tiny_llama_config

log = logging.getLogger("bench.lease_latency")
UPLOADER_NICENESS = 10
# vocabulary 1024, hidden 256, 4 layers, MLP 704: 3.4 M parameters, a 13.7 MB float32 delta
MODEL_SIZES = dict(vocab_size=1024, hidden=256, layers=4, heads=4, intermediate=704)


def make_model(folder: Path) -> Path:
    build_model(tiny_llama_config(**MODEL_SIZES), seed=0).to(torch.float32).save_pretrained(folder)
    return folder


def fixed_delta(model_dir: Path) -> bytes:
    with SafetensorsFile(model_dir / "model.safetensors") as weights:
        return save({i.name: torch.full(tuple(i.shape), 1e-5, dtype=torch.float32) for i in weights.infos})


def paced(data: bytes, rate_mb_s: float, chunk: int = 1 << 16):
    """`data` in chunks at about `rate_mb_s` MB/s (a worker's network link); all at once when 0."""
    if rate_mb_s <= 0:
        yield data
        return
    started = time.monotonic()
    for offset in range(0, len(data), chunk):
        ahead = started + offset / (rate_mb_s * 2**20) - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        yield data[offset:offset + chunk]


def uploaders(url: str, tokens: list[str], delta_path: str, rate_mb_s: float, in_flight, merged, refused,
              stop) -> None:
    """Keep len(tokens) uploads going, from a process of its own at a lower CPU priority: in a real
    deployment the workers upload from other machines, and here the load they put on the machine
    (16 threads sending 13 MB each) must not slow the server or the probe more than the uploads do."""
    os.nice(UPLOADER_NICENESS)
    delta = Path(delta_path).read_bytes()

    def run(token: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120.0) as http:
            while not stop.is_set():
                reply = http.post("/v1/work/lease").json()
                if reply["status"] != "leased":
                    stop.wait(0.05)
                    continue
                with in_flight.get_lock():
                    in_flight.value += 1
                try:
                    response = http.put(f"/v1/work/leases/{reply['lease_id']}/delta", content=paced(delta, rate_mb_s),
                                        headers={"Content-Length": str(len(delta))})
                finally:
                    with in_flight.get_lock():
                        in_flight.value -= 1
                counter = merged if response.status_code == 200 else refused
                with counter.get_lock():
                    counter.value += 1

    threads = [threading.Thread(target=run, args=(t,)) for t in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def probe(http: httpx.Client, admin: httpx.Client, job: str, n: int, interval: float,
          in_flight=None) -> tuple[list[float], list[int]]:
    """n lease calls (each lease revoked at once by the admin, untimed: a worker's give-back would
    count as a failure of the copy, and max_copy_failures of them end the job); latencies in ms."""
    latencies, flying = [], []
    for _ in range(n):
        if in_flight is not None:
            flying.append(in_flight.value)
        started = time.perf_counter()
        response = http.post("/v1/work/lease")
        latencies.append((time.perf_counter() - started) * 1000.0)
        reply = response.raise_for_status().json()
        if reply["status"] == "leased":
            admin.post(f"/v1/jobs/{job}/leases/{reply['lease_id']}/revoke").raise_for_status()
        time.sleep(interval)
    return latencies, flying


def summary(latencies: list[float]) -> dict:
    values = np.array(latencies)
    return {"n": len(values), "p50_ms": round(float(np.percentile(values, 50)), 2),
            "p99_ms": round(float(np.percentile(values, 99)), 2), "max_ms": round(float(values.max()), 2)}


def run(args: argparse.Namespace, tmp: Path) -> dict:
    model_dir = make_model(tmp / "model")
    delta_path = tmp / "delta.safetensors"
    delta_path.write_bytes(fixed_delta(model_dir))
    server = LocalServer(tmp / "state", tmp / "saves", lease_ttl_s=600.0, log_path=tmp / "server.log")
    with server, httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"},
                              timeout=120.0) as admin:
        pum = {"copies_m": args.copies, "rounds_R": MAX_ROUNDS, "noise_kappa": 0.01, "noise_structure": "independent"}
        job = admin.post("/v1/jobs", json={"task": "bench-latency", "model_dir": str(model_dir), "pum": pum,
                                           "hyperparams": {}}).raise_for_status().json()["id"]
        tokens = [admin.post(f"/v1/jobs/{job}/tokens", json={"label": f"t{i}"}).raise_for_status().json()["token"]
                  for i in range(args.uploads + 1)]
        admin.post(f"/v1/jobs/{job}/start").raise_for_status()
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=60) as http:
            probe(http, admin, job, 10, 0.0)  # warm-up: connections, first requests
            load_before = os.getloadavg()[0]
            idle, _ = probe(http, admin, job, args.probes, args.interval)

            context = multiprocessing.get_context("spawn")
            in_flight, merged, refused = context.Value("i", 0), context.Value("i", 0), context.Value("i", 0)
            stop = context.Event()
            load = context.Process(target=uploaders, args=(server.url, tokens[1:], str(delta_path), args.rate,
                                                           in_flight, merged, refused, stop))
            load.start()
            deadline = time.monotonic() + 120
            while in_flight.value < args.uploads:  # every uploader has its upload going
                if time.monotonic() > deadline or not load.is_alive():
                    raise RuntimeError(f"only {in_flight.value} uploads in flight; see {tmp / 'server.log'}")
                time.sleep(0.01)
            merged_before = merged.value
            started = time.monotonic()
            busy, flying = probe(http, admin, job, args.probes, args.interval, in_flight)
            busy_s = time.monotonic() - started
            load_after = os.getloadavg()[0]
            merged_during = merged.value - merged_before
            stop.set()
            load.join(timeout=300)
        status = admin.get(f"/v1/jobs/{job}").raise_for_status().json()
    idle_s, busy_s_ = summary(idle), summary(busy)
    return {
        "uploads": args.uploads, "rate_mb_s_per_upload": args.rate, "delta_mb": round(delta_path.stat().st_size / 2**20, 1),
        "probes": args.probes,
        "idle": idle_s, "busy": busy_s_, "p99_ratio": round(busy_s_["p99_ms"] / idle_s["p99_ms"], 2),
        "in_flight_at_probe": {"mean": round(float(np.mean(flying)), 1), "min": int(min(flying))},
        "uploads_merged_during_probes": merged_during, "uploads_merged_per_s": round(merged_during / busy_s, 1),
        "uploads_refused": refused.value, "accepted": sum(r["accepted"] for r in status["rounds"]),
        "load_average_1min": [round(load_before, 2), round(load_after, 2)], "cpus": os.cpu_count(),
        "target_ms": args.target_ms, "ok": busy_s_["p99_ms"] <= args.target_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=16, help="uploads kept in flight (default 16)")
    parser.add_argument("--rate", type=float, default=2.0,
                        help="MB/s each upload is sent at, a worker's link (default 2; 0: as fast as loopback goes)")
    parser.add_argument("--probes", type=int, default=300, help="lease calls timed per phase (default 300)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between probes (default 0.05)")
    parser.add_argument("--copies", type=int, default=MAX_COPIES, help=f"copies m of each round (default {MAX_COPIES})")
    parser.add_argument("--target-ms", type=float, default=50.0, help="the busy p99 to meet (default 50)")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (the server's log, state)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="pum-bench-latency-") as tmp:
            result = run(args, Path(tmp))
    for phase in ("idle", "busy"):
        s = result[phase]
        print(f"lease, {phase:4s}: n={s['n']}  p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  max {s['max_ms']:7.2f} ms")
    flying = result["in_flight_at_probe"]
    print(f"uploads in flight at each busy probe: mean {flying['mean']}, min {flying['min']} (target {args.uploads}, "
          f"each sent at {args.rate:g} MB/s); {result['uploads_merged_during_probes']} merged meanwhile "
          f"({result['uploads_merged_per_s']}/s, {result['delta_mb']} MB each), {result['uploads_refused']} refused")
    print(f"busy p99 / idle p99 = {result['p99_ratio']}; busy p99 within {args.target_ms:g} ms: {result['ok']} "
          f"(1-min load average {result['load_average_1min'][0]} → {result['load_average_1min'][1]} on {result['cpus']} CPUs)")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
