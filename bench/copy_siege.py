"""Benchmark: lease, admin and /healthz latency under a siege, against the same server idle.

Starts a real `pum server` (uvicorn) on 127.0.0.1 with a 17 MB-copy model. Phase 1, idle: a probe
times --probes rounds of (GET /healthz on a fresh connection, lease + give back, admin status).
Phase 2, siege: one token holds --stalled leases of a bait job and downloads each copy with a
4 KiB receive window it never reads, and --idle sockets connect and send nothing; the probe
repeats phase 1, then another token's copy download is timed (slots go first to the token that
holds fewest, so it waits at most send_timeout_s for one). Prints p50/p99/max of both phases and their ratio, then one JSON object.

    python bench/copy_siege.py [--stalled 40] [--idle 1000] [--probes 100] [--send-timeout 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from pum.demo.cluster import LocalServer

PROBES = ("healthz", "lease", "admin")


def make_model(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=16384, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=False)
                     ).save_pretrained(folder)
    return folder


def probe(server: LocalServer, admin: httpx.Client, token: str, job: str, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in PROBES}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as w:
        for _ in range(rounds):
            start = time.perf_counter()
            assert healthz(server.port).startswith(b"HTTP/1.1 200")
            times["healthz"].append(time.perf_counter() - start)
            start = time.perf_counter()
            lease = w.post("/v1/work/lease").json()["lease_id"]
            times["lease"].append(time.perf_counter() - start)
            w.post(f"/v1/work/leases/{lease}/release", json={"reason": "probe"}).raise_for_status()
            start = time.perf_counter()
            admin.get(f"/v1/jobs/{job}").raise_for_status()
            times["admin"].append(time.perf_counter() - start)
    return times


def healthz(port: int) -> bytes:
    """GET /healthz on a fresh connection (what a new client meets: accept, parse, answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


def summary(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stalled", type=int, default=40)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--send-timeout", type=float, default=5.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.idle + args.stalled + 512)), hard))

    with tempfile.TemporaryDirectory(prefix="pum-siege-") as tmp:
        root = Path(tmp)
        model = make_model(root / "model")
        env = {"PUM_SERVER_SEND_TIMEOUT_S": str(args.send_timeout), "PUM_SERVER_HEADER_TIMEOUT_S": "600"}
        with LocalServer(root / "state", root / "saves", extra_env=env) as server, \
                httpx.Client(base_url=server.url, timeout=120,
                             headers={"Authorization": f"Bearer {server.admin_token}"}) as admin:
            def job(task: str, m: int) -> tuple[str, str]:
                job_id = admin.post("/v1/jobs", json={"task": task, "model_dir": str(model),
                                                      "pum": {"copies_m": m, "rounds_R": 1}}).json()["id"]
                token = admin.post(f"/v1/jobs/{job_id}/tokens", json={"label": task}).json()["token"]
                admin.post(f"/v1/jobs/{job_id}/start").raise_for_status()
                return job_id, token

            probe_job, probe_token = job("probe", 4)
            idle = probe(server, admin, probe_token, probe_job, args.probes)

            bait, hoarder = job("bait", args.stalled + 1)
            honest = admin.post(f"/v1/jobs/{bait}/tokens", json={"label": "honest"}).json()["token"]
            held = []
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {hoarder}"}) as h:
                leases = [h.post("/v1/work/lease").json()["lease_id"] for _ in range(args.stalled)]
            for lease in leases:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", server.port))
                sock.sendall(f"GET /v1/work/leases/{lease}/copy HTTP/1.1\r\nHost: b\r\n"
                             f"Authorization: Bearer {hoarder}\r\n\r\n".encode())
                held.append(sock)
            held += [socket.create_connection(("127.0.0.1", server.port)) for _ in range(args.idle)]
            time.sleep(1.0)
            busy = probe(server, admin, probe_token, probe_job, args.probes)
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {honest}"}, timeout=120) as w:
                mine = w.post("/v1/work/lease").json()["lease_id"]
                start = time.perf_counter()
                size = len(w.get(f"/v1/work/leases/{mine}/copy").content)
            honest_s = time.perf_counter() - start
            for sock in held:
                sock.close()

    result = {"stalled": args.stalled, "idle": args.idle, "send_timeout_s": args.send_timeout,
              "honest_download_s": round(honest_s, 2), "copy_bytes": size}
    for name in PROBES:
        result[name] = {"idle": summary(idle[name]), "siege": summary(busy[name])}
        result[name]["p99_ratio"] = round(result[name]["siege"]["p99_ms"] / result[name]["idle"]["p99_ms"], 2)
        print(f"{name:8s} idle {result[name]['idle']}  siege {result[name]['siege']}  p99 ×{result[name]['p99_ratio']}")
    print(f"honest copy download under siege: {honest_s:.2f} s for {size} bytes")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
