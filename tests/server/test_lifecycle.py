"""Every admin action from every job state, over HTTP: allowed ones move the job as the table says,
refused ones answer 409 naming the state and change nothing. On the in-memory backend (fast);
the store suite checks the SQLite store refuses the same writes."""

from __future__ import annotations

import itertools

import pytest

from pum.common.states import ACTIONS, JobAction, JobState

# how to bring a fresh (created) job to each state
SETUP = {
    JobState.CREATED: [], JobState.RUNNING: ["start"], JobState.PAUSED: ["start", "pause"],
    JobState.ABORTED: ["abort"], JobState.FINALIZED: ["start", "finalize"],
}
EXPECTED = {  # action → state after it, from an allowed state
    JobAction.START: JobState.RUNNING, JobAction.PAUSE: JobState.PAUSED, JobAction.RESUME: JobState.RUNNING,
    JobAction.ABORT: JobState.ABORTED, JobAction.FINALIZE: JobState.FINALIZED,
}


@pytest.fixture
def memory_server(tmp_path, server_factory):
    return server_factory(tmp_path, backend="memory")


@pytest.mark.parametrize("state, action", list(itertools.product(SETUP, [a for a in JobAction if a is not JobAction.ADVANCE])))
def test_an_action_moves_the_job_only_from_its_allowed_states(memory_server, tiny_model_dir, state, action):
    server = memory_server
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 2}, start=False)
    for step in SETUP[state]:
        assert server.admin.post(f"/v1/jobs/{job}/{step}").status_code == 200
    before = server.admin.get(f"/v1/jobs/{job}").json()
    response = server.admin.post(f"/v1/jobs/{job}/{action}")
    if state in ACTIONS[action].sources:
        assert response.status_code == 200, response.text
        assert response.json()["state"] == EXPECTED[action]
    else:
        assert response.status_code == 409
        assert f"cannot {action} job {job}: it is {state}" in response.json()["detail"]
        assert server.admin.get(f"/v1/jobs/{job}").json() == before


def test_an_ended_job_hands_out_no_lease_and_takes_no_upload(memory_server, tiny_model_dir):
    server = memory_server
    job = server.create_job(tiny_model_dir, {"copies_m": 2})
    worker = server.worker(server.token(job))
    lease = worker.post("/v1/work/lease").json()["lease_id"]
    server.admin.post(f"/v1/jobs/{job}/abort")
    status = server.admin.get(f"/v1/jobs/{job}").json()
    assert [c["state"] for c in status["rounds"][0]["copies"]] == ["pending", "pending"]  # the lease was ended
    assert worker.post("/v1/work/lease").json() == {"status": "done", "job_state": "aborted"}
    response = worker.post(f"/v1/work/leases/{lease}/heartbeat")
    assert response.status_code == 410 and "cancelled" in response.json()["detail"]


def test_unknown_jobs_and_actions_are_404(memory_server):
    assert memory_server.admin.post("/v1/jobs/job-nope/start").status_code == 404
    assert memory_server.admin.post("/v1/jobs/job-nope/explode").status_code == 404
