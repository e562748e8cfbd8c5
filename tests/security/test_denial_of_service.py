"""Denial of service against a real `pum server` process on loopback: stalled copy downloads, cut
downloads, half-sent requests, large unauthenticated bodies and idle sockets. Every test bounds
its own sockets and time; the server's deadlines are set short through PUM_SERVER_* variables."""

from __future__ import annotations

import socket
import struct
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from pum.client.admin import AdminAPI
from pum.client.cli import http_client
from pum.common.states import JobAction
from pum.demo.cluster import LocalServer

pytestmark = pytest.mark.e2e
RECV_BUFFER = 4096  # a stalled reader's receive window: the server's send buffer fills after a few MiB


@contextmanager
def pum_server(root: Path, **settings):
    """A `pum server` process with the given ServerSettings fields (through the environment)."""
    env = {f"PUM_SERVER_{name.upper()}": str(value) for name, value in settings.items()}
    server = LocalServer(root / "state", root / "saves", log_path=root / "server.log", extra_env=env)
    with server:
        yield server


def started_job(server: LocalServer, model_dir: Path, copies: int, tokens: int = 2) -> tuple[str, list[str]]:
    with http_client(server.url, server.admin_token, timeout=120) as http:
        admin = AdminAPI(http)
        job = admin.create_job("dos", str(model_dir), {"copies_m": copies, "rounds_R": 1}, {}).id
        issued = [admin.issue_token(job, f"w{i}") for i in range(tokens)]
        admin.action(job, JobAction.START)
    return job, issued


def worker(server: LocalServer, token: str, timeout: float = 20.0) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


def raw(server: LocalServer, request: bytes = b"", recv_buffer: int | None = None) -> socket.socket:
    """A loopback socket to the server that sends `request` (maybe nothing, maybe half) and reads nothing."""
    sock = socket.socket()
    if recv_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
    sock.connect(("127.0.0.1", server.port))
    if request:
        sock.sendall(request)
    return sock


def get(path: str, token: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: pum\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


def stalled_download(server: LocalServer, token: str, lease: str) -> socket.socket:
    return raw(server, get(f"/v1/work/leases/{lease}/copy", token), recv_buffer=RECV_BUFFER)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes `sock` within `within_s` (whatever it sent before is drained)."""
    sock.settimeout(within_s)
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return True
    except ConnectionResetError:
        return True
    except (socket.timeout, TimeoutError):
        return False
    return False


def reply(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """What the server answers on `sock` until it closes it (or `timeout_s` passes)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, TimeoutError, ConnectionResetError):
        pass
    return data


def lease_of(client: httpx.Client) -> str:
    response = client.post("/v1/work/lease")
    assert response.status_code == 200 and response.json()["status"] == "leased", response.text
    return response.json()["lease_id"]


def download(client: httpx.Client, lease: str) -> int:
    with client.stream("GET", f"/v1/work/leases/{lease}/copy") as response:
        assert response.status_code == 200, response.read()
        received = sum(len(chunk) for chunk in response.iter_bytes())
    assert received == int(response.headers["content-length"])
    return received


def timed(call) -> tuple[float, httpx.Response]:
    start = time.monotonic()
    response = call()
    return time.monotonic() - start, response


def test_stalled_downloads_block_neither_other_copies_nor_leases_heartbeats_and_admin_calls(tmp_path, big_model_dir):
    """47 downloads that never read (the review's count): the copy slots free after the send timeout,
    a second download of a lease is refused, and lease, heartbeat and admin answers need no copy slot
    and no thread a stream holds."""
    with pum_server(tmp_path, send_timeout_s=3) as server:
        job, (hoarder, honest) = started_job(server, big_model_dir, copies=48)
        with worker(server, hoarder) as h, worker(server, honest) as w, ExitStack() as stack:
            leases = [lease_of(h) for _ in range(47)]
            for lease in leases:
                stack.callback(stalled_download(server, hoarder, lease).close)
            time.sleep(1.0)  # the server has taken every request
            answers = {
                "healthz": timed(lambda: w.get("/healthz")),
                "lease": timed(lambda: w.post("/v1/work/lease")),
                "admin status": timed(lambda: httpx.get(f"{server.url}/v1/jobs/{job}", timeout=20, headers={
                    "Authorization": f"Bearer {server.admin_token}"})),
            }
            mine = answers["lease"][1].json()["lease_id"]
            answers["heartbeat"] = timed(lambda: w.post(f"/v1/work/leases/{mine}/heartbeat"))
            assert all(r.status_code == 200 for _, r in answers.values()), {k: r.text for k, (_, r) in answers.items()}
            took, size = timed(lambda: download(w, mine))
            assert size > 16 * 2**20
            second = stack.enter_context(raw(server, get(f"/v1/work/leases/{leases[-1]}/copy", hoarder)))
            assert b" 409 " in reply(second, timeout_s=3).split(b"\r\n")[0]  # one download per lease at a time (the last still waits for a slot)
            print({name: round(s, 3) for name, (s, _) in answers.items()}, f"honest download {took:.2f} s")


def test_a_cut_download_frees_its_slot_at_once(tmp_path, big_model_dir):
    """One copy slot and no send timeout to speak of: only the cut itself can free the slot."""
    with pum_server(tmp_path, max_concurrent_copies=1, send_timeout_s=600) as server:
        _, (first, second) = started_job(server, big_model_dir, copies=2)
        with worker(server, first) as a, worker(server, second) as b:
            cut = raw(server, get(f"/v1/work/leases/{lease_of(a)}/copy", first))
            assert len(cut.recv(4096)) > 0
            cut.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            cut.close()  # a reset, as a worker that dies mid-download leaves
            assert download(b, lease_of(b)) > 16 * 2**20


def test_half_sent_requests_and_silent_sockets_time_out(tmp_path):
    with pum_server(tmp_path, header_timeout_s=1, body_timeout_s=2) as server, ExitStack() as stack:
        silent = stack.enter_context(raw(server))
        half_header = stack.enter_context(raw(server, b"GET /healthz HTTP/1.1\r\nHost: pum\r\nX-Slow: "))
        assert closed_by_server(silent, within_s=10)
        assert closed_by_server(half_header, within_s=10)
        # headers complete, body half sent (an admin route: the token is right, the body never ends)
        half_body = stack.enter_context(raw(server, (
            f"POST /v1/jobs HTTP/1.1\r\nHost: pum\r\nAuthorization: Bearer {server.admin_token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"task\": ").encode()))
        answer = reply(half_body, timeout_s=10)
        assert b" 408 " in answer.split(b"\r\n")[0] and b"within 2 s" in answer
        # a keep-alive connection must send its next request's headers in time too
        kept = stack.enter_context(raw(server, b"GET /healthz HTTP/1.1\r\nHost: pum\r\n\r\nGET /hea"))
        assert b" 200 " in reply(kept, timeout_s=10)
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


def test_a_large_body_is_refused_before_it_is_read(tmp_path, tiny_model_dir):
    """200 MiB announced, 64 KiB sent: the refusal comes at once, and the rest is never waited for."""
    big = 200 * 2**20
    with pum_server(tmp_path) as server, ExitStack() as stack:
        _, (token,) = started_job(server, tiny_model_dir, copies=2, tokens=1)
        cases = {  # token → the answer, without the body
            None: b" 401 ", "not-a-token": b" 401 ", token: b" 413 ", server.admin_token: b" 413 ",
        }
        for bearer, status in cases.items():
            auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
            sock = stack.enter_context(raw(server, (
                f"POST /v1/jobs HTTP/1.1\r\nHost: pum\r\n{auth}Content-Type: application/json\r\n"
                f"Content-Length: {big}\r\n\r\n").encode() + b"[" * 65536))
            answer = reply(sock, timeout_s=10)  # b"" if the server waited for the body
            assert status in answer.split(b"\r\n")[0], (bearer, answer[:300])
        # the JSON cap holds for a chunked body (no Content-Length) too
        sock = stack.enter_context(raw(server, (
            f"POST /v1/jobs HTTP/1.1\r\nHost: pum\r\nAuthorization: Bearer {server.admin_token}\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n").encode()
            + b"".join(b"10000\r\n" + b" " * 65536 + b"\r\n" for _ in range(20))))
        assert b" 413 " in reply(sock).split(b"\r\n")[0]


def test_idle_sockets_past_the_cap_make_room_for_a_new_client(tmp_path):
    with pum_server(tmp_path, max_connections=50, header_timeout_s=60) as server, ExitStack() as stack:
        idle = [stack.enter_context(raw(server)) for _ in range(50)]
        time.sleep(0.5)
        for _ in range(5):
            assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        dropped = [i for i, sock in enumerate(idle) if closed_by_server(sock, within_s=0.2)]
        assert dropped and min(dropped) == 0  # the longest idle went first


def test_sigterm_ends_the_server_while_a_copy_stream_is_open(tmp_path, big_model_dir):
    """SIGTERM: the server stops accepting at once, lets the open stream run for the grace period,
    then ends it and exits 0 (it used to wait for the stalled stream for ever)."""
    with pum_server(tmp_path, shutdown_grace_s=2, send_timeout_s=600) as server, ExitStack() as stack:
        _, (token, _) = started_job(server, big_model_dir, copies=2)
        with worker(server, token) as w:
            stalled = stack.enter_context(stalled_download(server, token, lease_of(w)))
        time.sleep(1.0)
        server.process.terminate()
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/healthz", timeout=2)
        assert server.process.wait(timeout=60) == 0
        assert closed_by_server(stalled, within_s=5)
        log = (tmp_path / "server.log").read_text()
        assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in log  # the grace ran out, the stream open
        # the one traceback is uvicorn's report of the task it cancelled, nothing of the stream's own
        assert log.count("Traceback") == log.count("CancelledError: Task cancelled, timeout graceful shutdown exceeded")
