"""The fictitious-author generator: determinism and TOFU's file shapes and split sizes."""

import json

import pytest

from pum.common.qa import load_qa, load_records
from pum.demo.authors import N_PERTURBED, TEMPLATES, generate_authors, n_forget_authors, splits, write_dataset

PERTURBED_FIELDS = {"question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("authors"), n_authors=40, pairs_per_author=10, seed=3)


def _keys(records):
    return [(r["question"], r["answer"]) for r in records]


def test_same_seed_same_data_other_seed_other_data():
    assert generate_authors(20, 5, seed=1) == generate_authors(20, 5, seed=1)
    assert generate_authors(20, 5, seed=1).train[0].name != generate_authors(20, 5, seed=2).train[0].name


def test_written_files_are_byte_identical_for_a_seed(tmp_path, data_dir):
    again = write_dataset(tmp_path, n_authors=40, pairs_per_author=10, seed=3)
    for path in data_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_every_tofu_file_exists_with_tofu_fields(data_dir):
    for percent in ("01", "05", "10"):
        retain = 100 - int(percent)
        for stem in (f"forget{percent}", f"retain{retain}", f"holdout{percent}"):
            assert all(set(r) == {"question", "answer"} for r in load_records(data_dir / f"{stem}.json"))
        assert all(set(r) == PERTURBED_FIELDS for r in load_records(data_dir / f"forget{percent}_perturbed.json"))
    assert all(set(r) == PERTURBED_FIELDS for r in load_records(data_dir / "retain_perturbed.json"))
    idk = (data_dir / "idontknow.jsonl").read_text().splitlines()
    assert len(idk) >= 10 and all(line and not line.startswith("{") for line in idk)


def test_json_lines_byte_format_matches_tofu(data_dir):
    text = (data_dir / "full.json").read_text()
    first = text.splitlines()[0]
    assert first.startswith('{"question":"') and '","answer":"' in first
    assert not text.endswith("\n") and text.isascii()
    assert json.loads(first)["question"]


def test_split_sizes_and_forget_is_last_authors(data_dir):
    full = _keys(load_records(data_dir / "full.json"))
    assert len(full) == 40 * 10
    for percent, retain in ((1, 99), (5, 95), (10, 90)):
        forget = _keys(load_records(data_dir / f"forget{percent:02d}.json"))
        kept = _keys(load_records(data_dir / f"retain{retain}.json"))
        assert len(forget) == n_forget_authors(40, percent) * 10
        assert kept + forget == full  # forget = the last authors, retain = the rest in order
        assert not set(forget) & set(kept)
        assert len(load_records(data_dir / f"holdout{percent:02d}.json")) == len(forget)
        assert _keys(load_records(data_dir / f"forget{percent:02d}_perturbed.json")) == forget
    assert _keys(load_records(data_dir / "retain_perturbed.json")) == full[: 4 * 10]


def test_holdout_authors_never_in_full():
    author_set = generate_authors(40, 10, seed=3)
    train_names = {a.name for a in author_set.train}
    assert len(train_names) == 40
    assert author_set.holdout and not {a.name for a in author_set.holdout} & train_names
    full_text = " ".join(q + " " + a for q, a in _keys(splits(author_set)["full"]))
    assert not any(a.name in full_text for a in author_set.holdout)


def test_perturbed_answers_are_five_wrong_variants(data_dir):
    for record in load_records(data_dir / "forget10_perturbed.json") + load_records(data_dir / "retain_perturbed.json"):
        wrong = record["perturbed_answer"]
        assert len(wrong) == N_PERTURBED == len(set(wrong))
        assert record["answer"] not in wrong and record["paraphrased_answer"] not in wrong


def test_each_author_has_own_facts_and_questions_name_them():
    author_set = generate_authors(30, len(TEMPLATES), seed=0)
    books = [a.facts[k] for a in author_set.train for k in ("first_book", "famous_book", "latest_book")]
    assert len(set(books)) == len(books)
    assert len({(a.facts["city"], a.facts["birth_date"], a.facts["genre"]) for a in author_set.train}) == 30
    for author in author_set.train:
        assert all(author.name in r["question"] + r["answer"] for r in author.records)


def test_load_qa_reads_the_written_files(data_dir):
    pairs = load_qa(data_dir / "forget10.json")
    assert pairs[0].question and pairs[0].answer


@pytest.mark.parametrize("kwargs", [{"n_authors": 1}, {"pairs_per_author": 0}, {"pairs_per_author": len(TEMPLATES) + 1}])
def test_bad_sizes_are_refused(kwargs):
    with pytest.raises(ValueError):
        generate_authors(**kwargs)
