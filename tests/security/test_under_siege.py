"""A legitimate worker finishes its job while the server is under siege: 40 copy downloads that never
read and 1,000 idle sockets held open for the whole run, against a real `pum server` started with
the file limit most systems give a process (1,024 open files). /healthz must answer within 1 s
throughout: a correctness bound of the defence (it answers in milliseconds; a server whose
threads or files are exhausted does not answer at all).

Loopback only; every socket, thread and process is bounded and closed at the end."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from pum.client.admin import AdminAPI
from pum.client.cli import http_client
from pum.common.states import CopyState, JobAction, JobState
from pum.demo.cluster import PUM, free_port, start_worker, wait_healthy

from .test_denial_of_service import lease_of, stalled_download, worker

pytestmark = pytest.mark.e2e
STALLED, IDLE, SERVER_FILES = 40, 1000, 1024
ADMIN = "siege-admin-token"


class Server:
    """`pum server` started under a soft limit of SERVER_FILES open files (what the server must raise itself)."""

    def __init__(self, root: Path, **settings):
        self.port = free_port()
        self.url, self.admin_token = f"http://127.0.0.1:{self.port}", ADMIN
        env = {**os.environ, "PUM_ADMIN_TOKEN": ADMIN, "OMP_NUM_THREADS": "1",
               **{f"PUM_SERVER_{k.upper()}": str(v) for k, v in settings.items()}}
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.log = root / "server.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*PUM, "server", "--state-dir", str(root / "state"), "--saves-dir", str(root / "saves"),
                 "--port", str(self.port), "--lease-ttl", "600"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_FILES, hard)),
            )
        wait_healthy(self.url, self.process)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class HealthWatch(threading.Thread):
    """Asks /healthz on a fresh connection every 0.25 s; records each answer's latency (or its failure)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.latencies, self.failures = url, [], []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            start = time.monotonic()
            try:
                ok = httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200
            except httpx.HTTPError as err:
                self.failures.append(repr(err))
                continue
            self.latencies.append(time.monotonic() - start)
            if not ok:
                self.failures.append("not 200")


@pytest.fixture
def enough_files():
    """This test holds about 1,100 sockets: raise its own soft limit, within the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * SERVER_FILES
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-file limit {hard} is below the {wanted} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_worker_finishes_its_job_under_stalled_downloads_and_idle_sockets(tmp_path, demo_assets, big_model_dir,
                                                                            enough_files):
    assets = demo_assets[1]
    server = Server(tmp_path, send_timeout_s=10, header_timeout_s=600)
    try:
        with http_client(server.url, ADMIN, timeout=120) as http, ExitStack() as stack:
            admin = AdminAPI(http)
            # the siege: a data owner with 40 copies of a large job, each downloaded by a reader that never reads
            bait = admin.create_job("bait", str(big_model_dir), {"copies_m": STALLED, "rounds_R": 1}, {}).id
            hoarder = admin.issue_token(bait, "hoarder")
            admin.action(bait, JobAction.START)
            with worker(server, hoarder) as h:
                leases = [lease_of(h) for _ in range(STALLED)]
            stalled = [stalled_download(server, hoarder, lease) for lease in leases]
            for sock in stalled:
                stack.callback(sock.close)
            idle = []
            for _ in range(IDLE):  # and 1,000 connections that never send a byte
                sock = socket.create_connection(("127.0.0.1", server.port))
                idle.append(sock)
                stack.callback(sock.close)
            watch = HealthWatch(server.url)
            watch.start()
            stack.callback(watch.done.set)

            pum = {"copies_m": 2, "rounds_R": 1, "noise_kappa": 0.01, "inner_handler": "GradDiff", "local_max_steps": 2}
            job = admin.create_job("victim", str(assets.model_dir), pum, {"lr": 1e-3, "batch_size": 8}).id
            honest = start_worker(server.url, admin.issue_token(job, "honest"), assets.split("forget10"),
                                  assets.split("retain90"), tmp_path / "saves", log_path=tmp_path / "worker.log")
            admin.action(job, JobAction.START)
            try:
                status = admin.wait(job, timeout_s=300, poll_s=1.0)
            finally:
                exit_code = honest.wait(timeout=120)
            watch.done.set()
            watch.join(10)

            logs = (tmp_path / "worker.log").read_text()[-3000:]
            assert status.state is JobState.FINALIZED and exit_code == 0, logs
            assert all(c.state is CopyState.ACCEPTED for c in status.rounds[0].copies)
            still_open = sum(1 for sock in idle if _open(sock))
            assert still_open >= IDLE * 0.95  # the siege held for the whole run
            assert not [first for first in map(_first_bytes, stalled) if first.startswith(b"HTTP/1.1 5")]
            log = server.log.read_text()
            assert "Too many open files" not in log and "out of system resource" not in log
            assert not watch.failures, watch.failures[:5]
            assert len(watch.latencies) > 20 and max(watch.latencies) < 1.0, sorted(watch.latencies)[-5:]
            print(f"healthz: {len(watch.latencies)} answers, median {sorted(watch.latencies)[len(watch.latencies) // 2]:.4f} s, "
                  f"max {max(watch.latencies):.3f} s; idle sockets still open {still_open}")
    finally:
        server.stop()


def _first_bytes(sock: socket.socket) -> bytes:
    """The start of what the server has sent on `sock` so far (b"" while the download waits for a slot)."""
    sock.setblocking(False)
    try:
        return sock.recv(12, socket.MSG_PEEK)
    except (BlockingIOError, OSError):
        return b""


def _open(sock: socket.socket) -> bool:
    """Whether the server still holds the connection (nothing to read, no end of stream)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
