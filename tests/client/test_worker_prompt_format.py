"""The job's prompt_format reaches the worker's batches: the same copy trained under chat and plain prompts."""

from __future__ import annotations

import json

from pum.client.api import WorkerAPI
from pum.client.worker import Worker, WorkerOptions


def first_loss(server, chat_model_dir, forget_pairs, tmp_path, prompt_format: str) -> float:
    task = f"t_{prompt_format}"
    pum = {"copies_m": 2, "rounds_R": 1, "inner_handler": "GradAscent", "local_max_steps": 1, "noise_kappa": 0.0,
           "prompt_format": prompt_format}
    job = server.create_job(chat_model_dir, pum, task=task)
    worker = Worker(WorkerAPI(server.worker(server.token(job))), forget_pairs, None,
                    WorkerOptions(saves_dir=tmp_path, progress=False, max_copies=1), sleep=lambda s: None)
    assert worker.run() == 1
    return json.loads((tmp_path / task / "pum_round1_copy0" / "metrics.json").read_text())["train"]["first_loss"]


def test_chat_and_plain_jobs_train_on_different_prompts(server, chat_model_dir, forget_pairs, tmp_path):
    chat = first_loss(server, chat_model_dir, forget_pairs, tmp_path, "chat")
    auto = first_loss(server, chat_model_dir, forget_pairs, tmp_path, "auto")  # the tokenizer has a template
    plain = first_loss(server, chat_model_dir, forget_pairs, tmp_path, "plain")
    assert chat == auto != plain
