"""Admin actions racing over real HTTP against a real `pum server` process: each pair ends as one
order of the two (200 and 409, or both 200 where both orders allow it), never a 500, and the
state is consistent with the answers."""

from __future__ import annotations

import threading

import httpx
import pytest

from pum.client.admin import AdminAPI
from pum.client.cli import http_client
from pum.common.states import ACTIONS, JobAction, JobState
from pum.demo.cluster import LocalServer

pytestmark = pytest.mark.e2e
PAIRS = [("created", "start", "start"), ("running", "finalize", "abort"), ("running", "finalize", "finalize"),
         ("created", "start", "abort"), ("paused", "resume", "finalize")]
REPEATS = 4


def in_order(state: JobState, actions) -> tuple[tuple[int, ...], JobState]:
    codes = []
    for action in map(JobAction, actions):
        allowed = state in ACTIONS[action].sources
        codes.append(200 if allowed else 409)
        state = ACTIONS[action].target if allowed else state
    return tuple(codes), state


def test_admin_actions_racing_over_http_end_as_one_order(tmp_path, demo_assets):
    model_dir = demo_assets[1].model_dir
    with LocalServer(tmp_path / "state", tmp_path / "saves", log_path=tmp_path / "server.log") as server, \
            http_client(server.url, server.admin_token) as http:
        admin = AdminAPI(http)
        for n, (state, a, b) in enumerate(p for p in PAIRS for _ in range(REPEATS)):
            job = admin.create_job(f"race{n}", str(model_dir), {"copies_m": 2, "rounds_R": 1}, {}).id
            for step in {"created": [], "running": ["start"], "paused": ["start", "pause"]}[state]:
                admin.action(job, step)
            barrier, codes = threading.Barrier(2), [0, 0]

            def post(i: int, action: str) -> None:
                with httpx.Client(base_url=server.url, headers=http.headers, timeout=60) as own:
                    barrier.wait()
                    codes[i] = own.post(f"/v1/jobs/{job}/{action}").status_code

            threads = [threading.Thread(target=post, args=(i, action)) for i, action in enumerate((a, b))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            status = admin.status(job)
            a_first, b_first = in_order(JobState(state), [a, b]), in_order(JobState(state), [b, a])
            possible = {a_first, (b_first[0][::-1], b_first[1])}
            assert (tuple(codes), status.state) in possible, (state, a, b, codes, status.state)
            exported = tmp_path / "saves" / f"race{n}" / "model.safetensors"
            assert exported.is_file() == (status.state is JobState.FINALIZED) == (status.output_dir is not None)
    assert " 500 " not in (tmp_path / "server.log").read_text()
