"""Job files: YAML 1.2 numbers, --set overrides, open-unlearning's names, and the precedence file < env < --set."""

from __future__ import annotations

import pytest

from pum.client.job_file import load_job_file, parse_overrides
from pum.common.errors import InvalidInput

JOB = """task: tofu_NPO
model_dir: open-unlearning/tofu_Llama-3.2-1B-Instruct_full
pum:
  inner_handler: NPO
  rounds_R: 2
hyperparams:
  learning_rate: 1e-5          # YAML 1.1 would read a string here; open-unlearning's configs say 1e-5
  num_train_epochs: 10
  per_device_train_batch_size: 8
  gradient_accumulation_steps: 4
  retain_loss_type: NLL
  beta: 0.1
"""


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB)
    return path


def test_open_unlearning_names_become_pums(job_file):
    job = load_job_file(job_file, environ={})
    assert job["hyperparams"] == {"lr": 1e-5, "batch_size": 32, "gradient_accumulation_steps": 4, "retain_loss": "nll",
                                  "beta": 0.1}
    assert job["pum"]["local_epochs"] == 10 and job["pum"]["inner_handler"] == "NPO"
    assert job["model_dir"] == "open-unlearning/tofu_Llama-3.2-1B-Instruct_full"  # resolved by the server


def test_set_overrides_win_over_the_environment_which_wins_over_the_file(job_file):
    env = {"PUM_ROUNDS_R": "5", "PUM_LOCAL_EPOCHS": "3"}
    job = load_job_file(job_file, environ=env)
    assert (job["pum"]["rounds_R"], job["pum"]["local_epochs"]) == (5, 3)
    job = load_job_file(job_file, environ=env, overrides=[
        "model_dir=/models/target", "pum.rounds_R=7", "hyperparams.learning_rate=2e-5", "hyperparams.num_train_epochs=4",
        "task=renamed"])
    assert (job["model_dir"], job["task"], job["pum"]["rounds_R"], job["pum"]["local_epochs"]) == ("/models/target", "renamed", 7, 4)
    assert job["hyperparams"]["lr"] == 2e-5 and "learning_rate" not in job["hyperparams"]


@pytest.mark.parametrize("pairs, phrase", [
    (["rounds_R=4"], "give task=…, model_dir=…, pum.NAME=… or hyperparams.NAME=…"),
    (["pum."], "give task=…"),
    (["other.x=1"], "give task=…"),
])
def test_bad_overrides_are_refused(pairs, phrase):
    with pytest.raises(ValueError, match=phrase):
        parse_overrides(pairs)


def test_an_alias_and_its_name_in_one_file_are_refused(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB + "  lr: 1e-5\n")
    with pytest.raises(InvalidInput, match="learning_rate .* and lr .* are the same setting"):
        load_job_file(path, environ={})
    path.write_text(JOB.replace("  rounds_R: 2\n", "  rounds_R: 2\n  local_epochs: 5\n"))
    with pytest.raises(InvalidInput, match="num_train_epochs .* and local_epochs"):
        load_job_file(path, environ={})
