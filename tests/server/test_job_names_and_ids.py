"""Job creation speaks open-unlearning: model ids from the local HF cache, its names, and the prompt format."""

from __future__ import annotations


def create(server, model_dir, pum=None, hyperparams=None):
    return server.admin.post("/v1/jobs", json={"task": "t", "model_dir": str(model_dir), "pum": {"seed": 7, **(pum or {})},
                                               "hyperparams": hyperparams or {}})


def test_model_dir_and_base_model_as_ids_of_the_local_cache(server, hf_cache, tiny_model_dir):
    snapshot = hf_cache.fill(tiny_model_dir, "open-unlearning/tofu_tiny_full")
    hf_cache.fill(tiny_model_dir, "org/tiny_base")
    response = create(server, "open-unlearning/tofu_tiny_full", {"base_model": "org/tiny_base", "noise_kappa": 0.01})
    assert response.status_code == 201, response.text
    job = server.service.store.job(response.json()["id"])
    assert job.spec.model_dir == str(snapshot) and job.spec.has_base is True


def test_an_id_missing_from_the_cache_is_a_400_naming_the_cache(server, hf_cache):
    response = create(server, "open-unlearning/not_here")
    assert response.status_code == 400
    assert f"local cache {hf_cache.path}" in response.json()["detail"]
    assert server.admin.get("/v1/jobs").json() == []  # nothing stored


def test_open_unlearning_names_are_stored_under_pums(server, tiny_model_dir):
    response = create(server, tiny_model_dir, hyperparams={"learning_rate": 1e-3, "num_train_epochs": 3,
                                                           "per_device_train_batch_size": 2})
    assert response.status_code == 201, response.text
    status = server.admin.get(f"/v1/jobs/{response.json()['id']}").json()
    assert status["hyperparams"] == {"lr": 1e-3, "batch_size": 2} and status["settings"]["local_epochs"] == 3
    clash = create(server, tiny_model_dir, {"local_epochs": 2}, {"num_train_epochs": 3})
    assert clash.status_code == 400 and "same setting" in clash.json()["detail"]
    odd = create(server, tiny_model_dir, hyperparams={"optim": ["adamw_torch"]})
    assert odd.status_code == 400 and "optim must be one of" in odd.json()["detail"]


def test_prompt_format_chat_needs_a_template_and_reaches_the_worker(server, tiny_model_dir, chat_model_dir):
    refused = create(server, tiny_model_dir, {"prompt_format": "chat"})
    assert refused.status_code == 400 and "no chat template" in refused.json()["detail"]
    job_id = server.create_job(chat_model_dir, {"prompt_format": "chat", "copies_m": 2})
    lease = server.worker(server.token(job_id)).post("/v1/work/lease").json()
    assert lease["task"]["prompt_format"] == "chat"
    auto = server.create_job(tiny_model_dir, {"copies_m": 2}, task="t2")
    assert server.worker(server.token(auto)).post("/v1/work/lease").json()["task"]["prompt_format"] == "auto"
