"""Benchmark: one round through PUM against the same round through a plain FastAPI + httpx server.

The round: k workers each download one copy and upload one update (a fixed float32 delta); the
server merges them and writes the model. PUM runs as a real `pum server` (m = k copies, noise on,
one round); the baseline is a minimal FastAPI server in its own process that streams θ as is,
parses each upload with safetensors, sums in float32 and writes θ + mean. Both on a 27 M and a
196 M-parameter Llama (random init, float32). Also measured in the same run: raw loopback TCP
GB/s, the RNG floor (torch's normal sampler: the floats PUM draws for m copies, one thread, the
server's setting), the disk's write + fsync GB/s with the seconds the k uploads take to write at
that rate (PUM keeps each upload durably until the step; the baseline keeps nothing), and the
servers' peak RSS. Then a projection to 7B and 70B (bf16, m = 4) from the measured per-GB costs.
Prints tables, then one JSON line last.

PUM's server puts large tensors on huge pages (pum.common.huge_pages); the baseline runs with a
plain process's defaults. `THP_MEM_ALLOC_ENABLE=1 python bench/round_throughput.py` gives both
huge pages, `THP_MEM_ALLOC_ENABLE=0` neither.

    python bench/round_throughput.py [--sizes 27m 196m] [--workers 4] [--copies 4]
    python bench/round_throughput.py --serve-plain PORT MODEL OUT K   # the baseline server (internal)

Timings are meaningful only on a quiet machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from fastapi import FastAPI, Request  # at module level: the route annotations are resolved here

from pum.client.admin import AdminAPI
from pum.client.api import WorkerAPI
from pum.common.codec import SafetensorsFile, TensorInfo, save_file_atomic
from pum.demo.cluster import LocalServer, free_port, wait_healthy
from pum.demo.tiny_model import build_model, tiny_llama_config

log = logging.getLogger("bench.round_throughput")
DELTA_VALUE = 1e-4
SIZES = {  # float32 Llamas, untied head; 32 k vocabulary but the test's 1m
    "27m": dict(vocab_size=32000, hidden=320, layers=4, heads=8, intermediate=864, tie=False),
    "196m": dict(vocab_size=32000, hidden=1024, layers=10, heads=16, intermediate=2816, tie=False),
    "1m": dict(vocab_size=2000, hidden=128, layers=2, heads=4, intermediate=512, tie=False),  # the script's test
}
PROJECTED = {"7B": 6.74e9, "70B": 68.98e9}  # parameters of Llama-2 7B and 70B
LINKS_GBIT = (1, 10, 25)


# ---- inputs ----------------------------------------------------------------------------------
def ensure_model(cache_dir: Path, size: str) -> Path:
    folder = cache_dir / f"llama_{size}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    model = build_model(tiny_llama_config(**SIZES[size]), seed=0).to(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_delta(model_dir: Path, path: Path) -> Path:
    with SafetensorsFile(model_dir / "model.safetensors") as weights:
        infos = [TensorInfo(i.name, "F32", i.shape) for i in weights.infos]
    save_file_atomic(path, infos, (torch.full(i.shape, DELTA_VALUE) for i in infos))
    return path


def parameters(model_dir: Path) -> int:
    with SafetensorsFile(model_dir / "model.safetensors") as weights:
        return sum(i.numel for i in weights.infos)


# ---- the same-run references -----------------------------------------------------------------
def loopback_gbps(total: int = 1 << 30, chunk: int = 1 << 20) -> float:
    """Raw TCP over 127.0.0.1: GB/s of one sender and one receiver."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def receive() -> None:
        connection, _ = server.accept()
        with connection:
            buffer = bytearray(chunk)
            while connection.recv_into(buffer):
                pass

    receiver = threading.Thread(target=receive)
    receiver.start()
    data = bytes(chunk)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sender:
        for _ in range(total // chunk):
            sender.sendall(data)
    receiver.join()
    server.close()
    return total / (time.perf_counter() - started) / 1e9


def disk_write_gb_s(folder: Path, total: int = 1 << 29, chunk: int = 1 << 20) -> float:
    """GB/s of writing a file and fsyncing it in `folder`: how PUM's server keeps each upload (durably)."""
    path, data = folder / "disk-probe.bin", os.urandom(chunk)
    started = time.perf_counter()
    with path.open("wb") as f:
        for _ in range(total // chunk):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return total / seconds / 1e9


def rng_floats_per_s(n: int = 1 << 25) -> float:
    """torch's normal sampler on one thread (the server runs with OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = torch.empty(n)
    generator = torch.Generator().manual_seed(0)
    out.normal_(generator=generator)
    started = time.perf_counter()
    out.normal_(generator=generator)
    elapsed = time.perf_counter() - started
    torch.set_num_threads(threads)
    return n / elapsed


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- PUM -------------------------------------------------------------------------------------
def pum_worker(url: str, token: str, delta: Path, errors: list[str]) -> None:
    """Lease, download the copy to /dev/null, upload the fixed delta; once."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600.0) as http:
        api = WorkerAPI(http)
        try:
            while (reply := api.lease()).status == "wait":
                time.sleep(0.05)
            if reply.status == "leased":
                api.download_copy(reply.lease_id, Path(os.devnull))
                api.upload_delta(reply.lease_id, delta)
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")


def pum_round(model_dir: Path, delta: Path, workers: int, copies: int, tmp: Path) -> dict:
    run = tmp / "pum"
    server = LocalServer(run / "state", run / "saves", lease_ttl_s=600.0, log_path=tmp / "pum.log", dev=True)
    with server, httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"},
                              timeout=600.0) as http:
        admin = AdminAPI(http)
        job = admin.create_job("bench", str(model_dir.resolve()),
                               {"copies_m": copies, "rounds_R": 1, "noise_kappa": 0.01, "seed": 0}, {}).id
        tokens = [admin.issue_token(job, f"w{i}") for i in range(workers)]
        admin.action(job, "start")
        errors: list[str] = []
        threads = [threading.Thread(target=pum_worker, args=(server.url, t, delta, errors)) for t in tokens]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        status = admin.wait(job, timeout_s=1800.0, poll_s=0.05)
        seconds = time.perf_counter() - started
        rss = peak_rss_mb(server.process.pid)
    shutil.rmtree(run, ignore_errors=True)
    if errors or status.state != "finalized":
        raise RuntimeError(f"PUM round: {status.state} {status.error} {errors} (log: {tmp / 'pum.log'})")
    return {"round_s": seconds, "peak_rss_mb": rss}


# ---- the plain FastAPI + httpx baseline --------------------------------------------------------
def serve_plain(port: int, model: Path, out: Path, k: int) -> None:
    """A minimal server: GET /copy streams θ, PUT /update sums float32 updates; the k-th writes θ + mean."""
    import uvicorn
    from fastapi.responses import StreamingResponse
    from safetensors.torch import load, save_file

    app = FastAPI()
    lock = threading.Lock()
    total: dict[str, torch.Tensor] = {}
    received = [0]

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/copy")
    def copy() -> StreamingResponse:
        def chunks():
            with model.open("rb") as f:
                while data := f.read(1 << 20):
                    yield data
        return StreamingResponse(chunks(), headers={"Content-Length": str(model.stat().st_size)})

    @app.put("/update")
    async def update(request: Request) -> dict:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
        tensors = load(bytes(body))
        with lock:
            for name, tensor in tensors.items():
                total[name] = total[name].add_(tensor) if name in total else tensor.float()
            received[0] += 1
            if received[0] == k:
                with SafetensorsFile(model) as theta:
                    save_file({n: theta.read(n).add_(total[n], alpha=1 / k) for n in theta.names}, str(out))
        return {"received": received[0]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def plain_worker(url: str, delta: Path, errors: list[str]) -> None:
    try:
        with httpx.Client(base_url=url, timeout=600.0) as http:
            with http.stream("GET", "/copy") as response, open(os.devnull, "wb") as sink:
                for chunk in response.iter_bytes(1 << 20):
                    sink.write(chunk)
            with delta.open("rb") as f:
                http.put("/update", content=iter(lambda: f.read(1 << 20), b""),
                         headers={"Content-Length": str(delta.stat().st_size)}).raise_for_status()
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")


def plain_round(model_dir: Path, delta: Path, workers: int, tmp: Path) -> dict:
    port, out = free_port(), tmp / "plain.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, __file__, "--serve-plain", str(port),
                                str(model_dir / "model.safetensors"), str(out), str(workers)], env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        errors: list[str] = []
        threads = [threading.Thread(target=plain_worker, args=(f"http://127.0.0.1:{port}", delta, errors))
                   for _ in range(workers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        rss = peak_rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    if errors or not out.is_file():
        raise RuntimeError(f"plain round: {errors}")
    out.unlink()
    return {"round_s": seconds, "peak_rss_mb": rss}


# ---- the projection ----------------------------------------------------------------------------
def projection(params: float, m: int, server_s_per_gb: float, rng_per_s: float) -> dict:
    """Bytes, disk and round time of one round of a bf16 model with m copies (see README, "Sizes").

    Per copy: a bf16 download (2 B/param) and a bf16 upload (`delta-bf16` or `trained`: 2 B/param).
    Server disk per round: θ and θ' in float32 (4 + 4 B/param written/read once each), z̄ (4 B/param
    written, read once per copy), each upload written and read once. Peak disk: θ, z̄, θ', the m uploads.
    Worker (float32 training): weights 4 + grads 4 + AdamW moments 8 + reference 4 = 20 B/param of
    RAM (÷ N under FSDP) plus activations; disk: the copy (2) and its float32 Δ (4) then bf16 (2).
    Round time at a link: max(the server's link carrying m·(down + up), the server's measured cost per
    GB moved) + the copies' noise on one core each (the RNG floor, m·params floats).
    """
    gb = 1e9
    down, up = 2 * params, 2 * params
    moved = m * (down + up)
    disk_io = 4 * params * 2 + 4 * params * (1 + m) + m * up * 2
    peak_disk = 4 * params * 3 + m * up
    times = {}
    for link in LINKS_GBIT:
        network = moved * 8 / (link * 1e9)
        times[f"{link}gbit_s"] = max(network, moved / gb * server_s_per_gb) + m * params / rng_per_s
    return {
        "download_gb_per_copy": down / gb, "upload_gb_per_copy": up / gb,
        "server_disk_io_gb": disk_io / gb, "server_peak_disk_gb": peak_disk / gb,
        "worker_disk_gb": (2 + 4) * params / gb, "worker_ram_gb_float32": 20 * params / gb,
        "round_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["27m", "196m"], choices=list(SIZES))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--copies", type=int, default=4, help="m of the PUM round (default: one copy per worker)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds per size and server (the median is kept)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--serve-plain", nargs=4, metavar=("PORT", "MODEL", "OUT", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_plain:
        port, model, out, k = args.serve_plain
        serve_plain(int(port), Path(model), Path(out), int(k))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="pum-throughput-"))
    tcp, rng, disk = loopback_gbps(), rng_floats_per_s(), disk_write_gb_s(tmp)
    log.info("loopback TCP %.2f GB/s, RNG %.0f M floats/s (one thread), disk write + fsync %.2f GB/s, load %.2f",
             tcp, rng / 1e6, disk, load)
    rows = []
    try:
        for size in args.sizes:
            model_dir = ensure_model(args.cache_dir, size)
            delta = write_delta(model_dir, tmp / f"delta_{size}.safetensors")
            params = parameters(model_dir)
            runs = {"pum": [], "plain": []}
            for _ in range(args.repeat):
                runs["plain"].append(plain_round(model_dir, delta, args.workers, tmp))
                runs["pum"].append(pum_round(model_dir, delta, args.workers, args.copies, tmp))
                log.info("%s: plain %.2f s, PUM %.2f s", size, runs["plain"][-1]["round_s"], runs["pum"][-1]["round_s"])
            median = {name: sorted(r, key=lambda x: x["round_s"])[len(r) // 2] for name, r in runs.items()}
            uploaded = args.workers * 4 * params  # each worker: one float32 Δ up (and one float32 copy down)
            moved = 2 * uploaded
            rows.append({
                "size": size, "params": params, "moved_gb": moved / 1e9,
                "pum_s": median["pum"]["round_s"], "plain_s": median["plain"]["round_s"],
                "ratio": median["pum"]["round_s"] / median["plain"]["round_s"],
                "pum_gb_s": moved / 1e9 / median["pum"]["round_s"], "plain_gb_s": moved / 1e9 / median["plain"]["round_s"],
                "rng_floor_s": args.copies * params / rng,
                "upload_write_floor_s": uploaded / 1e9 / disk,  # the uploads, durably on disk
                "pum_peak_rss_mb": median["pum"]["peak_rss_mb"], "plain_peak_rss_mb": median["plain"]["peak_rss_mb"],
            })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"load average {load:.2f}; loopback TCP {tcp:.2f} GB/s; RNG {rng / 1e6:.0f} M floats/s on one thread; "
          f"disk write + fsync {disk:.2f} GB/s; {args.workers} workers, m = {args.copies}")
    print(f"{'model':>6} {'params':>8} {'PUM s':>7} {'plain s':>8} {'ratio':>6} {'PUM GB/s':>9} {'plain GB/s':>11} "
          f"{'RNG floor s':>12} {'upload write s':>15} {'PUM RSS MB':>11} {'plain RSS MB':>13}")
    for r in rows:
        print(f"{r['size']:>6} {r['params'] / 1e6:>7.1f}M {r['pum_s']:>7.2f} {r['plain_s']:>8.2f} {r['ratio']:>6.2f} "
              f"{r['pum_gb_s']:>9.2f} {r['plain_gb_s']:>11.2f} {r['rng_floor_s']:>12.2f} "
              f"{r['upload_write_floor_s']:>15.2f} {r['pum_peak_rss_mb']:>11.0f} {r['plain_peak_rss_mb']:>13.0f}")
    largest = rows[-1]
    server_s_per_gb = (largest["pum_s"] - largest["rng_floor_s"]) / largest["moved_gb"]
    projected = {name: projection(p, 4, max(server_s_per_gb, 0.0), rng) for name, p in PROJECTED.items()}
    print(f"\nprojection, bf16, m = 4 (server cost {server_s_per_gb:.2f} s per GB moved beyond the RNG floor, "
          f"measured on {largest['size']}; training time not included)")
    print(f"{'model':>5} {'down GB':>8} {'up GB':>6} {'disk I/O GB':>12} {'peak disk GB':>13} {'worker disk GB':>15} "
          f"{'worker RAM GB':>14} " + " ".join(f"{f'{link} Gbit/s s':>11}" for link in LINKS_GBIT))
    for name, p in projected.items():
        print(f"{name:>5} {p['download_gb_per_copy']:>8.1f} {p['upload_gb_per_copy']:>6.1f} {p['server_disk_io_gb']:>12.0f} "
              f"{p['server_peak_disk_gb']:>13.0f} {p['worker_disk_gb']:>15.0f} {p['worker_ram_gb_float32']:>14.0f} "
              + " ".join(f"{p['round_s'][f'{link}gbit_s']:>11.0f}" for link in LINKS_GBIT))
    print(json.dumps({"load_average": load, "loopback_tcp_gb_s": tcp, "rng_floats_per_s": rng,
                      "disk_write_gb_s": disk, "workers": args.workers,
                      "copies": args.copies, "rounds": rows, "projection": projected,
                      "bench_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
