"""The admin side: job files (environment over file) and the AdminAPI against the in-process server."""

from __future__ import annotations

import json

import pytest

from pum.client.admin import AdminAPI
from pum.client.job_file import load_job_file
from pum.common.errors import Conflict, InvalidInput
from pum.common.schemas import JobStatus
from pum.common.states import JobAction, JobState


def write_job(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_job_file_settings_with_environment_override(tmp_path):
    path = write_job(tmp_path, "task: t\nmodel_dir: /m\npum:\n  copies_m: 5\n  rounds_R: 3\nhyperparams:\n  lr: 0.001\n")
    spec = load_job_file(path, environ={"PUM_ROUNDS_R": "4"})
    assert spec["pum"]["copies_m"] == 5 and spec["pum"]["rounds_R"] == 4
    assert spec["hyperparams"] == {"lr": 0.001} and spec["task"] == "t"


@pytest.mark.parametrize("text, phrase", [
    ("task: t\nmodel_dir: /m\nmodel: x\n", "unknown top-level keys ['model']"),
    ("model_dir: /m\n", "'task' is required"),
    ("task: t\nmodel_dir: /m\npum:\n  copies_m: 1\n", "copies_m must be in [2, 64]"),
])
def test_bad_job_files_are_refused_before_anything_is_sent(tmp_path, text, phrase):
    with pytest.raises((ValueError, InvalidInput), match=phrase.replace("[", r"\[").replace("]", r"\]")):
        load_job_file(write_job(tmp_path, text), environ={})


def test_admin_api_drives_a_job(server, tiny_model_dir, tmp_path):
    admin = AdminAPI(server.admin)
    job = admin.create_job("admin-t", str(tiny_model_dir), {"copies_m": 2}, {})
    assert isinstance(job, JobStatus) and job.state is JobState.CREATED
    assert [j.id for j in admin.jobs()] == [job.id]
    assert admin.action(job.id, JobAction.START).state is JobState.RUNNING
    assert admin.issue_token(job.id, "gpu0").startswith("pumw_")
    assert admin.privacy(job.id).rounds == 1
    with pytest.raises(Conflict, match="finalized"):
        admin.download_model(job.id, tmp_path / "out")
    assert admin.action(job.id, "finalize").state is JobState.FINALIZED
    files = sorted(p.name for p in admin.download_model(job.id, tmp_path / "out").iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert admin.wait(job.id, timeout_s=1).state is JobState.FINALIZED
    deleted = admin.delete_job(job.id)
    assert (deleted.id, deleted.state) == (job.id, JobState.FINALIZED) and admin.jobs() == []


def test_pum_admin_delete_removes_an_ended_job_and_refuses_a_running_one(server, tiny_model_dir, monkeypatch, capsys):
    from pum.cli import main

    monkeypatch.setattr("pum.client.cli.http_client", lambda *args, **kwargs: server.admin)
    job = server.create_job(tiny_model_dir, {"copies_m": 2})
    assert main(["admin", "delete", job]) == 2
    assert f"job {job} is running" in capsys.readouterr().err
    server.admin.post(f"/v1/jobs/{job}/abort")
    assert main(["admin", "delete", job]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job
    assert server.admin.get(f"/v1/jobs/{job}").status_code == 404
