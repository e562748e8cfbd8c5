"""A task belongs to one job (its model goes to saves/<task>/), until that job is deleted: a second
job with the task is 409 naming the owner; DELETE /v1/jobs/{id} removes an ended job, its records,
its state blobs and the model it exported, so the task can be used again."""

from __future__ import annotations

import pytest

from pum.common.states import JobState


@pytest.fixture(params=["sqlite", "memory"])
def any_server(request, tmp_path, server_factory):
    return server_factory(tmp_path, backend=request.param)


def create(server, model_dir, task: str):
    return server.admin.post("/v1/jobs", json={"task": task, "model_dir": str(model_dir),
                                               "pum": {"seed": 7, "copies_m": 2, "rounds_R": 1}})


def test_a_second_job_with_a_task_in_use_is_409_naming_its_owner_and_stores_nothing(server, tiny_model_dir):
    first = server.create_job(tiny_model_dir, task="shared", start=False)
    jobs_before = server.admin.get("/v1/jobs").json()
    folders_before = sorted(p.name for p in (server.settings.state_dir / "jobs").iterdir())
    response = create(server, tiny_model_dir, "shared")
    assert response.status_code == 409
    assert f"task 'shared' belongs to job {first}" in response.json()["detail"]
    assert f"pum admin delete {first}" in response.json()["detail"]
    assert server.admin.get("/v1/jobs").json() == jobs_before
    assert sorted(p.name for p in (server.settings.state_dir / "jobs").iterdir()) == folders_before


def test_a_finalized_job_deleted_frees_its_task_and_leaves_nothing(any_server, tiny_model_dir):
    server = any_server
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1}, task="reuse")
    token = server.token(job)
    assert server.admin.post(f"/v1/jobs/{job}/finalize").json()["state"] == "finalized"
    assert "model.safetensors" in server.service.context.saves.list("reuse")
    worker_file = "reuse/pum_round1_copy0/train_log.jsonl"  # what a worker on this host may save beside it
    server.service.context.saves.write_bytes(worker_file, b"{}\n")

    response = server.admin.delete(f"/v1/jobs/{job}")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == job and response.json()["state"] == "finalized"
    assert server.admin.get(f"/v1/jobs/{job}").status_code == 404
    assert server.admin.delete(f"/v1/jobs/{job}").status_code == 404
    assert job not in [j["id"] for j in server.admin.get("/v1/jobs").json()]
    assert server.service.context.files(job).list() == [] and server.service.context.files(job).list("public") == []
    assert server.service.context.saves.list("reuse") == []  # the export is gone
    assert server.service.context.saves.exists(worker_file)  # what the export did not write stays
    assert server.worker(token).post("/v1/work/lease").status_code == 401  # its tokens are gone

    again = create(server, tiny_model_dir, "reuse")
    assert again.status_code == 201, again.text


@pytest.mark.parametrize("setup", [[], ["start"], ["start", "pause"]])
def test_a_job_that_has_not_ended_is_409_and_kept_until_aborted(any_server, tiny_model_dir, setup):
    server = any_server
    job = server.create_job(tiny_model_dir, {"copies_m": 2}, start=False)
    for action in setup:
        assert server.admin.post(f"/v1/jobs/{job}/{action}").status_code == 200
    before = server.admin.get(f"/v1/jobs/{job}").json()
    response = server.admin.delete(f"/v1/jobs/{job}")
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert f"job {job} is {before['state']}" in detail and "abort it first" in detail
    assert server.admin.get(f"/v1/jobs/{job}").json() == before
    assert server.admin.post(f"/v1/jobs/{job}/abort").status_code == 200
    assert server.admin.delete(f"/v1/jobs/{job}").json()["state"] == JobState.ABORTED


def test_delete_needs_the_admin_token(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, start=False)
    server.admin.post(f"/v1/jobs/{job}/abort")
    assert server.worker(server.token(job)).delete(f"/v1/jobs/{job}").status_code in (401, 403)
    assert server.admin.get(f"/v1/jobs/{job}").status_code == 200


def test_two_creations_of_one_task_at_once_make_one_job(server, tiny_model_dir):
    import threading

    barrier, codes = threading.Barrier(2), []

    def post() -> None:
        barrier.wait()
        codes.append(create(server, tiny_model_dir, "raced").status_code)

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(codes) == [201, 409]
    jobs = server.admin.get("/v1/jobs").json()
    assert [j["task"] for j in jobs] == ["raced"]
    assert sorted(p.name for p in (server.settings.state_dir / "jobs").iterdir()) == [jobs[0]["id"]]  # no leftovers
