"""The cached tiny demo assets: they build fast, the model learnt its data, and a second call loads the cache."""

import dataclasses
import json

import pytest
import torch

torch.set_num_threads(1)

from pum.common.qa import mean_answer_probability  # noqa: E402
from pum.demo.assets import MARKER, TINY_SPEC, build_or_load, tiny_assets  # noqa: E402
from pum.demo.tiny_model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def built(demo_assets):
    """The session's tiny assets: the first call of tiny_assets on their cache built them."""
    return demo_assets


def test_tiny_assets_build_completely(built):
    """(How long the build takes is a measurement, not a test: `pum demo` prints it.)"""
    _, assets = built
    assert assets.built
    assert (assets.root / MARKER).is_file()
    assert (assets.model_dir / "model.safetensors").is_file()
    for stem in ("full", "forget10", "retain90", "holdout10", "forget10_perturbed", "retain_perturbed"):
        assert assets.split(stem).is_file()
    with pytest.raises(ValueError, match="known"):
        assets.split("forget42")


def test_fine_tuned_model_beats_the_untrained_one(built):
    _, assets = built
    tokenizer = assets.load_tokenizer()
    model = assets.load_model()
    pairs = assets.pairs("full")
    untrained = build_model(model.config, seed=1)
    before = mean_answer_probability(untrained, tokenizer, pairs)
    after = mean_answer_probability(model, tokenizer, pairs)
    assert before < 0.01  # ≈ 1 / vocabulary size
    assert after > before + 0.3, (before, after)
    assert assets.training["nll"] < assets.training["history"][0]


def test_second_call_loads_the_cache_without_training(built):
    cache, first = built
    marker_mtime = (first.root / MARKER).stat().st_mtime_ns
    weights_mtime = (first.model_dir / "model.safetensors").stat().st_mtime_ns
    again = tiny_assets(cache)
    assert not again.built and again == first
    assert (again.root / MARKER).stat().st_mtime_ns == marker_mtime
    assert (again.model_dir / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert again.training == first.training


def test_an_entry_without_marker_is_rebuilt(tmp_path, monkeypatch):
    calls = []
    import pum.demo.assets as assets_module

    real_build = assets_module._build_into

    def counting_build(*args, **kwargs):
        calls.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(assets_module, "_build_into", counting_build)
    spec = dataclasses.replace(TINY_SPEC, max_epochs=1)
    first = build_or_load(tmp_path, n_authors=4, pairs_per_author=3, spec=spec, threads=1, progress=False)
    (first.root / MARKER).unlink()  # as if the build had been interrupted before its last write
    second = build_or_load(tmp_path, n_authors=4, pairs_per_author=3, spec=spec, threads=1, progress=False)
    assert len(calls) == 2 and second.built and (second.root / MARKER).is_file()
    assert json.loads((second.root / MARKER).read_text())["fingerprint"] == second.fingerprint
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_parameters_change_the_cache_entry(tmp_path):
    spec = dataclasses.replace(TINY_SPEC, max_epochs=1)
    a = build_or_load(tmp_path, n_authors=4, pairs_per_author=3, spec=spec, threads=1, progress=False)
    b = build_or_load(tmp_path, n_authors=4, pairs_per_author=3, seed=1, spec=spec, threads=1, progress=False)
    assert a.root != b.root and a.fingerprint != b.fingerprint


def test_build_restores_the_callers_thread_count(tmp_path):
    spec = dataclasses.replace(TINY_SPEC, max_epochs=1)
    build_or_load(tmp_path, n_authors=4, pairs_per_author=2, spec=spec, threads=2, progress=False)
    assert torch.get_num_threads() == 1
