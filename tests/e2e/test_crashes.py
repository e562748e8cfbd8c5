"""Crashes of real processes: the server killed mid-round, a worker killed mid-training, a second
server started on a running one's state folder.

Nothing accepted is lost, nothing is counted twice, and a dead lease's late upload is refused.
"""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest
from safetensors.torch import load, save

from pum.client.admin import AdminAPI
from pum.client.api import WorkerAPI
from pum.client.cli import http_client
from pum.common.errors import LeaseExpired
from pum.common.states import CopyState, JobAction, JobState
from pum.demo.cluster import PUM as PUM_CLI
from pum.demo.cluster import LocalServer, free_port, start_worker

pytestmark = pytest.mark.e2e
PUM = {"copies_m": 3, "rounds_R": 1, "noise_kappa": 0.05, "seed": 11}
CLIPPED = {**PUM, "clip_update_norm": 0.1, "clip_update_norm_per_layer": 0.05}  # Δ = −0.01·copy: every group clipped


def deterministic_delta(copy_bytes: bytes) -> bytes:
    """A worker update that depends only on the copy it received."""
    return save({name: -0.01 * t.float() for name, t in load(copy_bytes).items()})


def worker_api(url: str, token: str) -> WorkerAPI:
    return WorkerAPI(httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60), retries=1)


def create(admin: AdminAPI, model_dir, pum: dict = PUM) -> tuple[str, str]:
    job = admin.create_job("crash", str(model_dir), pum, {}).id
    token = admin.issue_token(job)
    admin.action(job, JobAction.START)
    return job, token


def lease_copy(api: WorkerAPI) -> tuple[str, bytes]:
    lease = api.lease().lease_id
    return lease, api.http.get(f"/v1/work/leases/{lease}/copy").content


def upload(api: WorkerAPI, lease: str, body) -> httpx.Response:
    return api.http.put(f"/v1/work/leases/{lease}/delta", content=body, headers={"Content-Type": "application/octet-stream"})


@pytest.fixture(scope="module")
def model_dir(demo_assets):
    return demo_assets[1].model_dir


def run_uninterrupted(tmp_path, model_dir, pum: dict = PUM) -> bytes:
    with LocalServer(tmp_path / "a" / "state", tmp_path / "a" / "saves", dev=True) as server, \
            http_client(server.url, server.admin_token) as http:
        admin = AdminAPI(http)
        job, token = create(admin, model_dir, pum)
        api = worker_api(server.url, token)
        for _ in range(3):
            lease, copy = lease_copy(api)
            assert upload(api, lease, deterministic_delta(copy)).status_code == 200
        status = admin.wait(job, timeout_s=60)
        assert status.state is JobState.FINALIZED
        return (tmp_path / "a" / "saves" / "crash" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("pum", [PUM, CLIPPED], ids=["plain", "update-clipping"])
def test_server_killed_mid_round_recovers_the_same_model(tmp_path, model_dir, pum):
    """With update clipping the accepted copies' norms come back from the store after the restart."""
    expected = run_uninterrupted(tmp_path, model_dir, pum)

    state, saves = tmp_path / "b" / "state", tmp_path / "b" / "saves"
    server = LocalServer(state, saves, log_path=tmp_path / "server.log", dev=True).start()
    try:
        with http_client(server.url, server.admin_token) as http:
            job, token = create(AdminAPI(http), model_dir, pum)
        api = worker_api(server.url, token)
        for _ in range(2):  # two copies accepted before the crash
            lease, copy = lease_copy(api)
            assert upload(api, lease, deterministic_delta(copy)).status_code == 200
        lease, copy = lease_copy(api)
        body = deterministic_delta(copy)
        half_sent, server_dead, outcome, uploader = upload_in_two_halves(api, lease, body)
        assert half_sent.wait(30)
        round_dir = state / "jobs" / job / "rounds" / "r1"
        until(lambda: any(round_dir.glob(f".upload_{lease}*")), "the server writes the upload")
        server.kill()  # SIGKILL with an upload in flight
        server_dead.set()
        uploader.join(60)
        assert isinstance(outcome["r"], httpx.TransportError)

        restarted = LocalServer(state, saves, port=server.port, log_path=tmp_path / "server.log", dev=True).start()
        try:
            with http_client(restarted.url, restarted.admin_token) as http:
                admin = AdminAPI(http)
                status = admin.status(job)
                assert status.rounds[0].accepted == 2  # the interrupted upload left no trace
                assert not any(round_dir.glob(f"*upload_{lease}*"))  # the half upload was dropped
                assert upload(api, lease, body).status_code == 200  # the same lease, redone
                assert upload(api, lease, body).status_code == 409  # and counted once
                final = admin.wait(job, timeout_s=60)
            assert final.state is JobState.FINALIZED and final.rounds[0].accepted == 3
            # the uploads are reduced in the copies' order k, whatever order they were leased and sent in
            assert (saves / "crash" / "model.safetensors").read_bytes() == expected
        finally:
            restarted.stop()
    finally:
        server.stop()


def test_a_second_server_on_the_same_state_folder_exits_2_and_the_first_keeps_its_upload(tmp_path, model_dir):
    state, saves = tmp_path / "state", tmp_path / "saves"
    first = LocalServer(state, saves, log_path=tmp_path / "first.log", dev=True).start()
    try:
        with http_client(first.url, first.admin_token) as http:
            admin = AdminAPI(http)
            job, token = create(admin, model_dir)
            api = worker_api(first.url, token)
            lease, copy = lease_copy(api)
            half_sent, go_on, outcome, uploader = upload_in_two_halves(api, lease, deterministic_delta(copy))
            assert half_sent.wait(30)
            round_dir = state / "jobs" / job / "rounds" / "r1"  # an upload is written there, hidden until kept

            def writes() -> list[str]:
                return sorted(p.name for p in round_dir.glob(".upload_*.tmp")) if round_dir.is_dir() else []

            until(writes, "the first server writes the upload")
            in_flight = writes()

            second = subprocess.Popen(
                [*PUM_CLI, "server", "--state-dir", str(state), "--saves-dir", str(saves), "--port", str(free_port()),
                 "--dev"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                output, _ = second.communicate(timeout=60)
            except subprocess.TimeoutExpired:  # the old behaviour: it started, and serves
                second.kill()
                output, _ = second.communicate()
            assert second.returncode == 2, output[-2000:]
            assert f"pid {first.process.pid}" in output and str(state.resolve()) in output
            assert writes() == in_flight  # it deleted nothing

            go_on.set()
            uploader.join(60)
            assert outcome["r"].status_code == 200, outcome["r"]
            for _ in range(2):
                lease, copy = lease_copy(api)
                assert upload(api, lease, deterministic_delta(copy)).status_code == 200
            final = admin.wait(job, timeout_s=60)
            assert final.state is JobState.FINALIZED and final.rounds[0].accepted == 3
    finally:
        first.stop()
    # the lock ends with its holder: a server on the folder starts once the first has stopped
    with LocalServer(state, saves, log_path=tmp_path / "third.log", dev=True):
        pass


def upload_in_two_halves(api: WorkerAPI, lease: str, body: bytes):
    """Upload `body` on a thread that sends its first half, sets `half_sent`, and sends the rest once
    `go_on` is set: (half_sent, go_on, outcome {"r": response or exception}, the thread)."""
    half_sent, go_on, outcome = threading.Event(), threading.Event(), {}

    def halves():
        yield body[: len(body) // 2]
        half_sent.set()
        go_on.wait(60)
        yield body[len(body) // 2:]

    uploader = threading.Thread(target=lambda: outcome.setdefault("r", _try(upload, api, lease, halves())))
    uploader.start()
    return half_sent, go_on, outcome, uploader


def until(condition, what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` until it holds (a condition, not a guess at how long something takes)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def _try(function, *args):
    try:
        return function(*args)
    except Exception as err:  # the outcome is the assertion's business
        return err


def test_killed_worker_lease_expires_and_another_worker_finishes(tmp_path, demo_assets):
    assets = demo_assets[1]
    saves = tmp_path / "saves"
    server = LocalServer(tmp_path / "state", saves, lease_ttl_s=3.0, log_path=tmp_path / "server.log")
    with server, http_client(server.url, server.admin_token) as http:
        admin = AdminAPI(http)
        pum = {"copies_m": 2, "rounds_R": 1, "inner_handler": "GradAscent", "local_max_steps": 1000}
        job = admin.create_job("wcrash", str(assets.model_dir), pum, {"lr": 1e-5, "batch_size": 4}).id
        admin.action(job, JobAction.START)
        dead = worker_api(server.url, admin.issue_token(job, "dead"))
        dead_lease, _ = lease_copy(dead)  # leases and downloads; heartbeats until the victim is killed, then dies
        stopped = threading.Event()

        def heartbeats():
            while not stopped.is_set():
                dead.heartbeat(dead_lease)
                stopped.wait(0.5)

        threading.Thread(target=heartbeats, daemon=True).start()
        victim = start_worker(server.url, admin.issue_token(job, "victim"), assets.split("forget10"), None, saves,
                              log_path=tmp_path / "victim.log")

        def victim_trains() -> bool:  # its train log opens once the copy is downloaded and loaded
            assert victim.poll() is None, (tmp_path / "victim.log").read_text()[-2000:]
            return any((saves / "wcrash").glob("pum_round1_copy*/train_log.jsonl"))

        until(victim_trains, "the victim worker trains on its copy")
        assert [c.state for c in admin.status(job).rounds[0].copies] == [CopyState.LEASED, CopyState.LEASED]
        victim.kill()
        victim.wait()
        stopped.set()

        survivor = start_worker(server.url, admin.issue_token(job, "survivor"), assets.split("forget10"), None, saves,
                                log_path=tmp_path / "survivor.log")
        status = admin.wait(job, timeout_s=180)
        assert survivor.wait(timeout=60) == 0
        assert status.state is JobState.FINALIZED, (tmp_path / "survivor.log").read_text()[-2000:]
        copies = status.rounds[0].copies
        assert [c.state for c in copies] == [CopyState.ACCEPTED, CopyState.ACCEPTED]
        assert all(c.leases == 2 for c in copies)  # each copy was leased again after its lease expired
        with pytest.raises(LeaseExpired):
            dead.upload_delta(dead_lease, _write(tmp_path / "late.safetensors", b"late"))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
