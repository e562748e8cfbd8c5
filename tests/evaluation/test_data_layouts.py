"""`pum eval --data`: a TOFU folder the datasets library saved, and locuslab/TOFU from the local HF cache."""

from __future__ import annotations

import json

import pytest

from pum.evaluation.data import load_tofu, resolve_data


def test_a_tofu_folder_saved_by_datasets_is_evaluated(tmp_path, assets):
    datasets = pytest.importorskip("datasets")
    from pum.evaluation.data import load_tofu

    for path in assets.data_dir.glob("*.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / path.stem))
    from_arrow = load_tofu(tmp_path, "forget10")
    from_json = load_tofu(assets.data_dir, "forget10")
    assert from_arrow.records == from_json.records and from_arrow.files["forget"] == "forget10_perturbed"


def test_the_tofu_dataset_id_resolves_from_the_hf_cache(hf_cache, assets):
    snapshot = hf_cache.fill(assets.data_dir, "locuslab/TOFU", repo_type="dataset")
    folder = resolve_data("locuslab/TOFU")
    assert folder == snapshot
    assert load_tofu(folder, "forget10").records == load_tofu(assets.data_dir, "forget10").records
