"""TOFU splits in the layouts users have: JSON lines, the datasets library's save_to_disk folders, Parquet."""

from __future__ import annotations

import json

import pytest

from pum.common.qa import load_qa
from pum.common.splits import find_split, read_split

RECORDS = [{"question": f"Who is author {i}?", "answer": f"Author {i} is a poet.", "perturbed_answer": ["x", "y"]}
           for i in range(5)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "json" / "forget01.json"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_save_to_disk_folders_read_like_the_json_file(tmp_path, jsonl):
    datasets = pytest.importorskip("datasets")  # the test extra: the layout is written by the library itself
    dataset = datasets.Dataset.from_list(RECORDS)
    dataset.save_to_disk(str(tmp_path / "saved" / "forget01"))  # a Dataset
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dict" / "forget01"))  # load_dataset(...)'s
    dataset.to_parquet(str(tmp_path / "pq" / "forget01.parquet"))
    expected = read_split(jsonl)[0]
    for folder in ("saved", "dict", "pq"):
        found = find_split(tmp_path / folder, "forget01")
        assert found is not None, folder
        records, digest = read_split(found)
        assert records == expected == RECORDS and len(digest) == 64
    assert [p.question for p in load_qa(tmp_path / "dict" / "forget01")] == [r["question"] for r in RECORDS]
    assert find_split(tmp_path / "saved", "forget05") is None
