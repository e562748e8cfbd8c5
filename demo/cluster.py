"""Real server and worker processes on loopback: what `docker compose up` runs, without containers.

Used by `pum demo`, the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PUM = [sys.executable, "-m", "pum.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before answering")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} did not answer /healthz within {timeout_s:g} s")


@dataclass
class LocalServer:
    """`pum server` in a subprocess on a free loopback port; a context manager."""

    state_dir: Path
    saves_dir: Path
    admin_token: str = "demo-admin-token"
    lease_ttl_s: float = 60.0
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    dev: bool = False  # --dev: development mode, needed for seeded (reproducible, insecure) jobs
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalServer:
        self.port = self.port or free_port()
        env = {**os.environ, "PUM_ADMIN_TOKEN": self.admin_token, "OMP_NUM_THREADS": "1", **self.extra_env}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [*PUM, "server", "--state-dir", str(self.state_dir), "--saves-dir", str(self.saves_dir),
             "--port", str(self.port), "--lease-ttl", str(self.lease_ttl_s), *(["--dev"] if self.dev else [])],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        wait_healthy(self.url, self.process)
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_worker(
    url: str, token: str, forget: Path, retain: Path | None, saves_dir: Path,
    log_path: Path | None = None, threads: int = 1, extra_args: tuple[str, ...] = (),
) -> subprocess.Popen:
    """`pum worker` in a subprocess (CPU, no progress bars)."""
    args = [*PUM, "worker", "--server", url, "--token", token, "--forget", str(forget),
            "--saves-dir", str(saves_dir), "--threads", str(threads), "--no-progress", *extra_args]
    if retain:
        args += ["--retain", str(retain)]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
