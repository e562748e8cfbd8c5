"""Benchmark: what a Prometheus scrape of /metrics costs, against the admin API's own reads, same run.

Starts a real `pum server` on 127.0.0.1 with --jobs jobs (m = --copies, R = 2, manual σ with
center clipping against a public base, so each has an ε), each started, with a lease per copy
granted and half of them uploaded. Times --scrapes GET /metrics (the first separately: it computes
each job's privacy report; later ones reuse it until the job changes) against GET /v1/jobs and GET
/v1/jobs/{id} of every job, and prints p50/p95 and the ratios, then one JSON object as the last line.

    python bench/metrics_scrape.py [--jobs 20] [--copies 8] [--scrapes 50]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import load, save

from pum.demo.cluster import LocalServer


def tiny_llama(path: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, tie_word_embeddings=True)).save_pretrained(path)
    return path


def timed(get, path: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        assert get(path).status_code == 200
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs on the server")
    parser.add_argument("--copies", type=int, default=8, help="m of each job")
    parser.add_argument("--scrapes", type=int, default=50, help="timed requests of each kind")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pum-bench-metrics-") as tmp:
        root = Path(tmp)
        model, base = tiny_llama(root / "model", 0), tiny_llama(root / "base", 5)
        with LocalServer(root / "state", root / "saves") as server, httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=60) as admin:
            pum = {"copies_m": args.copies, "rounds_R": 2, "sigma": 0.01, "base_model": str(base),
                   "center_clip_C_per_layer": 0.5, "center_clip_C_global": 0.5}
            jobs = []
            for i in range(args.jobs):
                job = admin.post("/v1/jobs", json={"task": f"bench{i}", "model_dir": str(model), "pum": pum}).json()["id"]
                admin.post(f"/v1/jobs/{job}/start")
                token = admin.post(f"/v1/jobs/{job}/tokens", json={"label": f"gpu{i}"}).json()["token"]
                with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as w:
                    for k in range(args.copies):
                        lease = w.post("/v1/work/lease").json()["lease_id"]
                        if k % 2 == 0:
                            copy = load(w.get(f"/v1/work/leases/{lease}/copy").content)
                            w.put(f"/v1/work/leases/{lease}/delta", content=save({n: 0.01 * t.float() for n, t in copy.items()}))
                jobs.append(job)
            first = timed(admin.get, "/metrics", 1)[0]
            scrape = timed(admin.get, "/metrics", args.scrapes)
            listing = timed(admin.get, "/v1/jobs", args.scrapes)
            statuses = [sum(timed(admin.get, f"/v1/jobs/{job}", 1)) for job in jobs for _ in range(max(1, args.scrapes // len(jobs)))]
            size = len(admin.get("/metrics").content)
    p = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
    rows = {"GET /metrics": scrape, "GET /v1/jobs": listing, "GET /v1/jobs/{id}": statuses}
    for name, xs in rows.items():
        print(f"{name:20s} p50 {p(xs, 50):7.1f} ms   p95 {p(xs, 95):7.1f} ms")
    print(f"first scrape (every job's privacy report computed): {first:.1f} ms; exposition {size} bytes")
    ratio = p(scrape, 50) / p(statuses, 50)
    print(f"a scrape of {args.jobs} jobs costs {ratio:.1f}× one job's status (p50), "
          f"{p(scrape, 50) / p(listing, 50):.1f}× the job list")
    print(json.dumps({"jobs": args.jobs, "copies_m": args.copies, "first_scrape_ms": first,
                      "scrape_p50_ms": p(scrape, 50), "scrape_p95_ms": p(scrape, 95), "list_p50_ms": p(listing, 50),
                      "status_p50_ms": p(statuses, 50), "scrape_over_status": ratio, "exposition_bytes": size}))


if __name__ == "__main__":
    main()
