"""Benchmark: the server's peak memory does not grow with the number of copies m.

Runs a real `pum server` per m (fresh state, OMP_NUM_THREADS=1) on a ~60 M-parameter Llama,
drives one round with fake workers (lease, download and discard the copy, upload a fixed delta)
and reads the server's VmHWM (peak RSS) from /proc. Prints a table, then one JSON line last.
Exit code 0 when peak RSS(m_last) / peak RSS(m_first) < 1.15.

    python bench/server_memory.py [--copies 2 16] [--workers 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from pum.client.admin import AdminAPI
from pum.client.api import WorkerAPI
from pum.common.codec import SafetensorsFile, TensorInfo, save_file_atomic
from pum.demo.cluster import LocalServer
from pum.demo.tiny_model import build_model, tiny_llama_config

log = logging.getLogger("bench.server_memory")
MAX_RATIO = 1.15
DELTA_VALUE = 1e-4
# 32 k vocabulary, hidden 512, 8 layers, MLP 1536, untied head: 60.0 M parameters, 240 MB in float32.
MODEL_SIZES = dict(vocab_size=32000, hidden=512, layers=8, heads=8, intermediate=1536, tie=False)


def ensure_model(cache_dir: Path) -> Path:
    """A random-initialised float32 Llama saved with save_pretrained (reused when cached)."""
    if (cache_dir / "config.json").is_file() and (cache_dir / "model.safetensors").is_file():
        log.info("reusing the model in %s", cache_dir)
        return cache_dir
    started = time.monotonic()
    model = build_model(tiny_llama_config(**MODEL_SIZES), seed=0).to(torch.float32)
    model.save_pretrained(cache_dir, safe_serialization=True)
    log.info("built and saved the model to %s in %.1f s", cache_dir, time.monotonic() - started)
    return cache_dir


def model_layout(model_dir: Path) -> list[TensorInfo]:
    """The tensors of the saved file (unique tensors only: a tied head is not saved)."""
    with SafetensorsFile(model_dir / "model.safetensors") as weights:
        return list(weights.infos)


def write_delta(layout: list[TensorInfo], path: Path) -> Path:
    """The fixed upload: every tensor of the model, float32, filled with DELTA_VALUE."""
    infos = [TensorInfo(i.name, "F32", i.shape) for i in layout]
    save_file_atomic(path, infos, (torch.full(i.shape, DELTA_VALUE, dtype=torch.float32) for i in infos))
    return path


def proc_status_kb(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {field}")


def fake_worker(url: str, token: str, delta: Path, errors: list[str], name: str) -> None:
    """Lease, download the copy to /dev/null, upload the fixed delta; until the job is done."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600.0) as http:
        api = WorkerAPI(http)
        try:
            while (reply := api.lease())["status"] != "done":
                if reply["status"] == "wait":
                    time.sleep(min(reply.get("retry_after_s", 1.0), 0.5))
                    continue
                api.download_copy(reply["lease_id"], Path(os.devnull))
                api.upload_delta(reply["lease_id"], delta)
                log.info("%s: uploaded the delta of %s", name, reply["lease_id"][:16])
        except Exception as err:  # reported by the main thread; the job is aborted there
            log.exception("%s failed", name)
            errors.append(f"{name}: {type(err).__name__}: {err}")


def run_round(m: int, workers: int, model_dir: Path, delta: Path, tmp: Path) -> dict:
    """One fresh server, one job of one round with m copies; the server's RSS and the round's time."""
    run_dir = tmp / f"m{m}"
    run_dir.mkdir()
    server = LocalServer(run_dir / "state", run_dir / "saves", lease_ttl_s=600.0, log_path=run_dir / "server.log",
                         dev=True)
    with server:
        pid = server.process.pid
        idle_kb = proc_status_kb(pid, "VmRSS")
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"},
                          timeout=600.0) as http:
            admin = AdminAPI(http)
            pum = {"copies_m": m, "rounds_R": 1, "noise_kappa": 0.01, "seed": 0}
            job_id = admin.create_job(f"bench-m{m}", str(model_dir.resolve()), pum, {}).id
            tokens = [admin.issue_token(job_id, f"bench-{i}") for i in range(workers)]
            errors: list[str] = []
            threads = [threading.Thread(target=fake_worker, args=(server.url, t, delta, errors, f"worker-{i}"))
                       for i, t in enumerate(tokens)]
            started = time.monotonic()
            admin.action(job_id, "start")
            for thread in threads:
                thread.start()
            while any(t.is_alive() for t in threads) and not errors:
                time.sleep(0.2)
            if errors:
                admin.action(job_id, "abort")
            status = admin.wait(job_id, timeout_s=1800.0)
            round_s = time.monotonic() - started
            for thread in threads:
                thread.join()
        peak_kb = proc_status_kb(pid, "VmHWM")
    if errors or status.state != "finalized":
        raise RuntimeError(f"m={m}: job ended {status.state} ({status.error}); {errors}; "
                           f"server log: {run_dir / 'server.log'}")
    return {"m": m, "peak_rss_mb": round(peak_kb / 1024, 1), "idle_rss_mb": round(idle_kb / 1024, 1),
            "round_s": round(round_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[2, 16], help="values of m, smallest first (default 2 16)")
    parser.add_argument("--workers", type=int, default=2, help="concurrent fake workers (default 2)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/bench/model_50m"), help="model cache folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (state, server logs)")
    args = parser.parse_args(argv)
    if len(args.copies) < 2 or min(args.copies) < 2:
        parser.error("--copies needs at least two values, each ≥ 2 (e.g. --copies 2 16)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the rest

    model_dir = ensure_model(args.cache_dir)
    layout = model_layout(model_dir)
    params = sum(i.numel for i in layout)
    model_bytes = (model_dir / "model.safetensors").stat().st_size
    log.info("model: %d tensors, %.1f M parameters, %.0f MB", len(layout), params / 1e6, model_bytes / 2**20)

    tmp = Path(tempfile.mkdtemp(prefix="pum-bench-"))
    try:
        delta = write_delta(layout, tmp / "delta.safetensors")
        runs = []
        for m in args.copies:
            log.info("m=%d: starting a fresh server", m)
            runs.append(run_round(m, args.workers, model_dir, delta, tmp))
            log.info("m=%d: %s", m, runs[-1])
    finally:
        if args.keep:
            log.info("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    first, last = runs[0], runs[-1]
    ratio = last["peak_rss_mb"] / first["peak_rss_mb"]
    print(f"model: {params / 1e6:.1f} M parameters, {model_bytes / 2**20:.0f} MB; {args.workers} workers")
    print(f"{'m':>4} {'idle RSS MB':>12} {'peak RSS MB':>12} {'round s':>9}")
    for run in runs:
        print(f"{run['m']:>4} {run['idle_rss_mb']:>12.1f} {run['peak_rss_mb']:>12.1f} {run['round_s']:>9.1f}")
    print(f"peak RSS ratio m={last['m']} / m={first['m']}: {ratio:.3f} (pass below {MAX_RATIO})")
    passed = ratio < MAX_RATIO
    print(json.dumps({
        "params": params, "model_bytes": model_bytes, "workers": args.workers, "runs": runs,
        f"peak_rss_ratio_{last['m']}_over_{first['m']}": round(ratio, 3), "pass": passed,
    }))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
