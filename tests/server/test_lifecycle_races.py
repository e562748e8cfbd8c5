"""Two admin actions on one job at once, from threads against the app, many times over.

Every pair's outcome must be one of the two orders run one after the other (what the action table
gives): each request answers 200 or 409 — never 500 — and the end state is consistent (an aborted
job exported no model, a finalized job is not aborted and its model is on disk).
"""

from __future__ import annotations

import threading

import pytest

from pum.common.states import ACTIONS, JobAction, JobState

SETUP = {JobState.CREATED: [], JobState.RUNNING: ["start"], JobState.PAUSED: ["start", "pause"]}
PAIRS = [  # (state before, action a, action b)
    (JobState.CREATED, JobAction.START, JobAction.START),
    (JobState.CREATED, JobAction.START, JobAction.ABORT),
    (JobState.CREATED, JobAction.ABORT, JobAction.ABORT),
    (JobState.RUNNING, JobAction.FINALIZE, JobAction.ABORT),
    (JobState.RUNNING, JobAction.FINALIZE, JobAction.FINALIZE),
    (JobState.RUNNING, JobAction.ABORT, JobAction.ABORT),
    (JobState.RUNNING, JobAction.PAUSE, JobAction.ABORT),
    (JobState.RUNNING, JobAction.PAUSE, JobAction.FINALIZE),
    (JobState.RUNNING, JobAction.PAUSE, JobAction.PAUSE),
    (JobState.RUNNING, JobAction.ADVANCE, JobAction.FINALIZE),
    (JobState.PAUSED, JobAction.RESUME, JobAction.ABORT),
    (JobState.PAUSED, JobAction.RESUME, JobAction.FINALIZE),
    (JobState.PAUSED, JobAction.RESUME, JobAction.RESUME),
    (JobState.PAUSED, JobAction.FINALIZE, JobAction.ABORT),
]
ATTEMPTS = [pytest.param(2, id="2x"), pytest.param(4, marks=pytest.mark.slow, id="4x-more")]  # 6 races a pair in all


def run_in_order(state: JobState, actions: list[JobAction]) -> tuple[list[int], JobState]:
    """What the actions answer one after the other, and the state they leave (advance never
    succeeds here: the round has no copies in)."""
    codes = []
    for action in actions:
        if state in ACTIONS[action].sources and action is not JobAction.ADVANCE:
            codes.append(200)
            state = ACTIONS[action].target
        else:
            codes.append(409)
    return codes, state


def race(client, paths: list[str]) -> list[int]:
    """POST every path at once (the threads start together at a barrier); their status codes."""
    barrier, codes = threading.Barrier(len(paths)), [0] * len(paths)

    def post(i: int) -> None:
        barrier.wait()
        codes[i] = client.post(paths[i]).status_code

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return codes


@pytest.mark.parametrize("attempts", ATTEMPTS)
@pytest.mark.parametrize("state, a, b", PAIRS, ids=[f"{s}-{a}-{b}" for s, a, b in PAIRS])
def test_two_actions_at_once_end_as_one_order_of_them(server, tiny_model_dir, state, a, b, attempts):
    a_first, b_first = run_in_order(state, [a, b]), run_in_order(state, [b, a])
    possible = {(tuple(a_first[0]), a_first[1]), (tuple(b_first[0][::-1]), b_first[1])}
    seen = set()
    for i in range(attempts):
        task = f"race{i}"
        job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1}, task=task, start=False)
        for step in SETUP[state]:
            assert server.admin.post(f"/v1/jobs/{job}/{step}").status_code == 200
        codes = race(server.admin, [f"/v1/jobs/{job}/{a}", f"/v1/jobs/{job}/{b}"])
        status = server.admin.get(f"/v1/jobs/{job}").json()
        outcome = (tuple(codes), JobState(status["state"]))
        assert outcome in possible, f"repeat {i}: {outcome} is neither order of {a}, {b} from {state}"
        exported = server.settings.saves_dir / task
        if outcome[1] is JobState.FINALIZED:
            assert status["output_dir"] and (exported / "model.safetensors").is_file()
        else:
            assert status["output_dir"] is None and not exported.exists()
        seen.add(outcome)
    assert seen  # (both orders need not show up: the lock decides which comes first)


def test_an_abort_does_not_wait_behind_a_start_and_the_start_then_loses(server, tiny_model_dir, monkeypatch):
    """start's noise draws (m of the model's size) run outside the job's lock: an abort answers at once."""
    import pum.server.lifecycle as lifecycle

    job = server.create_job(tiny_model_dir, {"copies_m": 2}, start=False)
    preparing, finish, real = threading.Event(), threading.Event(), lifecycle.prepare_round

    def slow_prepare(*args):
        preparing.set()
        assert finish.wait(60)
        return real(*args)

    monkeypatch.setattr(lifecycle, "prepare_round", slow_prepare)
    codes = {}

    def act(action: str) -> None:
        codes[action] = server.admin.post(f"/v1/jobs/{job}/{action}").status_code

    starter = threading.Thread(target=act, args=("start",))
    starter.start()
    assert preparing.wait(30)
    aborter = threading.Thread(target=act, args=("abort",))
    aborter.start()
    aborter.join(20)
    assert codes.get("abort") == 200, "the abort waited behind the start"
    finish.set()
    starter.join(60)
    assert codes["start"] == 409
    status = server.admin.get(f"/v1/jobs/{job}").json()
    assert status["state"] == "aborted" and status["rounds"] == []
