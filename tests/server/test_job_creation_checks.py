"""Mistakes a worker would refuse are a 400 at POST /v1/jobs, listing the known names, with nothing
stored: an unknown inner_handler, unknown or ill-typed hyperparameters, a retain term without a
retain set, hyperparameters nested too deep; and an out-of-range setting names the field and range."""

from __future__ import annotations

import pytest

from pum.common.methods_catalog import METHODS, TRAINER_PARAMS


def post(server, model_dir, pum=None, hyperparams=None, task="checked"):
    body = {"task": task, "model_dir": str(model_dir), "pum": {"seed": 7, **(pum or {})},
            "hyperparams": hyperparams if hyperparams is not None else {}}
    return server.admin.post("/v1/jobs", json=body)


def refused(server, model_dir, *phrases, pum=None, hyperparams=None) -> str:
    response = post(server, model_dir, pum, hyperparams)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    for phrase in phrases:
        assert phrase in detail, detail
    assert server.admin.get("/v1/jobs").json() == []  # nothing stored
    jobs = server.settings.state_dir / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())
    return detail


def test_an_unknown_inner_handler_is_400_listing_the_methods(server, tiny_model_dir):
    detail = refused(server, tiny_model_dir, "unknown inner_handler 'NPOO'", pum={"inner_handler": "NPOO"})
    assert all(name in detail for name in METHODS) and "IdkDPO" in detail


def test_unknown_hyperparameters_are_400_listing_the_trainer_and_method_keys(server, tiny_model_dir):
    detail = refused(server, tiny_model_dir, "unknown hyperparameter(s) 'betta' for method NPO",
                     pum={"inner_handler": "NPO"}, hyperparams={"lr": 1e-5, "betta": 0.2})
    assert all(p.name in detail for p in TRAINER_PARAMS) and "beta, gamma, alpha, retain_loss (NPO)" in detail


@pytest.mark.parametrize("hyperparams, phrase", [
    ({"lr": "fast"}, "lr must be a number (got 'fast')"),
    ({"batch_size": 8.5}, "batch_size must be an integer (got 8.5)"),
    ({"batch_size": True}, "batch_size must be an integer (got True)"),
    ({"beta": [0.1]}, "beta must be a number (got [0.1])"),
    ({"retain_loss": "mse"}, "retain_loss must be one of nll, kl (got 'mse')"),
    ({"optimizer": "adam"}, "optimizer must be one of adamw, sgd (got 'adam')"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be true or false (got 'yes')"),
    ({"max_grad_norm": "none"}, "max_grad_norm must be a number or null (got 'none')"),
])
def test_an_ill_typed_hyperparameter_is_400_naming_it(server, tiny_model_dir, hyperparams, phrase):
    refused(server, tiny_model_dir, phrase, pum={"inner_handler": "NPO"}, hyperparams=hyperparams)


@pytest.mark.parametrize("method, hyperparams", [("NPO", {}), ("GradDiff", {"alpha": 0.5}), ("CE-U", {"alpha": 1}),
                                                 ("RMU", {})])
def test_a_retain_term_without_a_retain_set_is_400(server, tiny_model_dir, method, hyperparams):
    refused(server, tiny_model_dir, f"{method} with alpha = ", "this job has none (retain: false)",
            "set hyperparams.alpha to 0", pum={"inner_handler": method, "retain": False}, hyperparams=hyperparams)


@pytest.mark.parametrize("method, hyperparams", [("GradAscent", {}), ("NPO", {"alpha": 0}), ("CEU", {}),
                                                 ("UNDIAL", {"beta": 5})])
def test_a_method_without_a_retain_term_runs_without_a_retain_set(server, tiny_model_dir, method, hyperparams):
    response = post(server, tiny_model_dir, {"inner_handler": method, "retain": False}, {"lr": 1e-5, **hyperparams})
    assert response.status_code == 201, response.text
    assert response.json()["settings"]["retain"] is False


def test_open_unlearning_names_and_aliases_are_accepted(server, tiny_model_dir):
    response = post(server, tiny_model_dir, {"inner_handler": "idkdpo"},
                    {"learning_rate": 1e-5, "per_device_train_batch_size": 4, "beta": 0.1, "max_grad_norm": None})
    assert response.status_code == 201, response.text


def test_hyperparams_nested_300_deep_are_400_and_nothing_is_stored(server, tiny_model_dir):
    deep: dict = {}
    for _ in range(300):
        deep = {"x": deep}
    refused(server, tiny_model_dir, "hyperparams is nested deeper than 4 levels", hyperparams={"lr": 1e-5, "n": deep})
    refused(server, tiny_model_dir, "pum is nested deeper than 4 levels", pum={"sigma_per_layer": deep})
    refused(server, tiny_model_dir, "holds more than 10000 values", hyperparams={"x": list(range(20_000))})


@pytest.mark.parametrize("pum, phrase", [
    ({"copies_m": 10**6}, "copies_m must be in [2, 64] (got 1000000)"),
    ({"sigma": 1e308}, "sigma must be in [0, 100] (got 1e+308)"),
    ({"eta_srv": 1e308}, "eta_srv must be in (0, 10] (got 1e+308)"),
])
def test_an_unbounded_setting_is_400_naming_field_and_range(server, tiny_model_dir, pum, phrase):
    refused(server, tiny_model_dir, phrase, pum=pum)
