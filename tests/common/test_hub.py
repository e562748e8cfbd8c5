"""Hugging Face ids resolved from a local cache that huggingface_hub itself wrote (no network)."""

from __future__ import annotations

import os

import pytest

from pum.common.errors import InvalidInput
from pum.common.hub import resolve_local


def test_a_model_id_resolves_to_its_cached_snapshot(hf_cache, tiny_model_dir):
    snapshot = hf_cache.fill(tiny_model_dir, "open-unlearning/tofu_tiny_full")
    assert (hf_cache.path / "models--open-unlearning--tofu_tiny_full" / "refs" / "main").is_file()
    assert os.path.islink(snapshot / "model.safetensors")  # the layout huggingface_hub writes: links into blobs/
    resolved = resolve_local("open-unlearning/tofu_tiny_full", "model_dir")
    assert resolved == snapshot
    assert (resolved / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_a_folder_wins_and_a_missing_id_names_the_cache(hf_cache, tiny_model_dir):
    assert resolve_local(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(InvalidInput, match=f"model_dir 'org/absent' is neither a folder here nor a Hugging Face model id "
                                           f"in the local cache {hf_cache.path}"):
        resolve_local("org/absent", "model_dir")
    with pytest.raises(InvalidInput, match="neither a folder here"):
        resolve_local("/no/such/folder", "base_model")


def test_a_dataset_id_resolves_from_the_cache(hf_cache, tmp_path):
    source = tmp_path / "tofu"
    source.mkdir()
    (source / "forget01.json").write_text('{"question": "q?", "answer": "a."}\n')
    snapshot = hf_cache.fill(source, "locuslab/TOFU", repo_type="dataset")
    assert resolve_local("locuslab/TOFU", "--data", repo_type="dataset") == snapshot
    assert (snapshot / "forget01.json").read_text().startswith('{"question"')
