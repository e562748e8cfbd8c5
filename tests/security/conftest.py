"""Fixtures of the security tests: a real `pum server` process on 127.0.0.1 with the knobs
`pum.demo.cluster.LocalServer` does not expose (log level, TLS, a readiness check of our own),
and read-only looks at a running server's SQLite state."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import pytest

from pum.demo.cluster import free_port

ADMIN_TOKEN = "security-admin-token"


@dataclass
class ServerProcess:
    """A `pum server` subprocess; `log_path` holds its stdout and stderr."""

    url: str
    process: subprocess.Popen
    state_dir: Path
    saves_dir: Path
    log_path: Path
    admin_token: str

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def wait_ready(ping: Callable[[], bool], process: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    """Poll `ping` every 0.2 s (bounded by `timeout_s`) until it answers True."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if ping():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server did not answer within {timeout_s:g} s:\n{log_path.read_text()[-3000:]}")


def start_server_process(
    root: Path, *, lease_ttl_s: float = 30.0, log_level: str = "INFO", tls: tuple[Path, Path] | None = None,
    ca_file: Path | None = None, dev: bool = False, log_format: str = "text",
) -> ServerProcess:
    """`python -m pum.cli --log-level LEVEL server …` on a free loopback port, ready when /healthz answers.
    `dev`: development mode (the admin token is still required), for seeded jobs."""
    port = free_port()
    scheme = "https" if tls else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    state_dir, saves_dir, log_path = root / "state", root / "saves", root / "server.log"
    args = [sys.executable, "-m", "pum.cli", "--log-level", log_level, "--log-format", log_format, "server", "--state-dir", str(state_dir),
            "--saves-dir", str(saves_dir), "--host", "127.0.0.1", "--port", str(port), "--lease-ttl", str(lease_ttl_s)]
    if tls:
        args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    if dev:
        args.append("--dev")
    env = {**os.environ, "PUM_ADMIN_TOKEN": ADMIN_TOKEN, "OMP_NUM_THREADS": "1"}
    with log_path.open("ab") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    import ssl

    verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True

    def ping() -> bool:
        return httpx.get(f"{url}/healthz", timeout=1.0, verify=verify).status_code == 200

    server = ServerProcess(url, process, state_dir, saves_dir, log_path, ADMIN_TOKEN)
    try:
        wait_ready(ping, process, log_path)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def server_process(tmp_path):
    """A factory of started server processes, all stopped at teardown."""
    started: list[ServerProcess] = []

    def start(**kwargs) -> ServerProcess:
        root = tmp_path / f"server{len(started)}"
        root.mkdir()
        server = start_server_process(root, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def read_only_db(state_dir: Path) -> sqlite3.Connection:
    """A read-only connection to a server's state.db (WAL readers never block its writer)."""
    db = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
    db.row_factory = sqlite3.Row
    return db


def lease_copies(state_dir: Path) -> dict[str, tuple[int, int]]:
    """lease id → (round, copy index k), read from the server's `leases` table."""
    db = read_only_db(state_dir)
    try:
        return {row["id"]: (row["round"], row["k"]) for row in db.execute("SELECT id, round, k FROM leases")}
    finally:
        db.close()


@pytest.fixture
def state_db():
    """Read-only looks at a server's SQLite state: `.connect(state_dir)`, `.lease_copies(state_dir)`."""
    from types import SimpleNamespace

    return SimpleNamespace(connect=read_only_db, lease_copies=lease_copies)


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory) -> Path:
    """A random-init Llama whose copy (about 17 MB) cannot hide in loopback's socket buffers (4 MiB):
    a download that is not read stalls the server's send."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16384, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("big") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    return path
