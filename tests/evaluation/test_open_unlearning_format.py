"""open-unlearning's TOFU_EVAL.json both ways: a file hand-made to its schema is read, summarised and written
back unchanged, PUM's own files have its layout, and forget quality from either kind of retain log is the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pum.evaluation import metrics
from pum.evaluation.data import load_tofu
from pum.evaluation.logs import scores
from pum.evaluation.summary import SUMMARY_KEYS, open_unlearning_summary, summarise
from pum.evaluation.tofu import EVAL_FILE, SUMMARY_FILE, EvalOptions, _save, evaluate, read_eval, reference_eval

GOLDEN = Path(__file__).parent / "golden" / "TOFU_EVAL.open-unlearning.json"
FAST = dict(max_new_tokens=8, progress=False)


def layout(value):
    """The shape of a logs value: dict keys (index keys collapsed to one), list lengths dropped, leaf types."""
    if isinstance(value, dict):
        keys = sorted(value, key=str)
        if keys and all(str(k).isdigit() for k in keys):
            return {"<index>": layout(value[keys[0]])}
        return {k: layout(v) for k, v in value.items()}
    if isinstance(value, list):
        return [layout(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) or value is None else type(value).__name__


def test_the_golden_file_reads_and_summarises_to_its_own_values():
    logs = read_eval(GOLDEN)
    summary = summarise(logs)
    expected = {name: entry["agg_value"] for name, entry in json.loads(GOLDEN.read_text()).items()}
    for key in SUMMARY_KEYS:
        if key in expected and key != "forget_quality":
            assert summary[key] == pytest.approx(expected[key]), key
    assert summary["model_utility_partial"] is False and summary["forget_quality"] is None
    assert summarise(logs, logs)["forget_quality"] == 1.0  # against itself


def test_logs_without_an_attack_summarise_without_privleak():
    logs = {k: v for k, v in read_eval(GOLDEN).items() if k != "mia_min_k"}
    summary = summarise(logs)
    assert summary["privleak"] is None and summary["n_holdout"] is None
    assert any("no mia_min_k" in note for note in summary["notes"])


def test_a_reference_in_another_prompt_format_is_refused(pum_eval):
    _, out, _ = pum_eval
    logs = read_eval(out)
    other = json.loads(json.dumps(logs))
    other["pum"]["prompt_format"] = "chat"
    with pytest.raises(ValueError, match="prompt format 'chat' \\(need 'plain'\\)"):
        summarise(logs, other)


def test_the_golden_file_round_trips(tmp_path):
    logs = read_eval(GOLDEN)
    _save(tmp_path, logs, summarise(logs))
    written = json.loads((tmp_path / EVAL_FILE).read_text())
    original = json.loads(GOLDEN.read_text())
    assert {k: v for k, v in written.items() if k != "pum"} == original  # every key and value kept as it was
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert set(summary) == set(SUMMARY_KEYS)
    assert {k: v for k, v in summary.items() if v is not None} == pytest.approx(
        {k: original[k]["agg_value"] for k in SUMMARY_KEYS if k in original and original[k]["agg_value"] is not None})


@pytest.fixture(scope="module")
def pum_eval(assets, tmp_path_factory):
    """PUM's evaluation of the tiny model on forget10 (with every utility split: ra and wf copied from forget)."""
    data = tmp_path_factory.mktemp("data")
    for f in assets.data_dir.iterdir():
        shutil.copy(f, data / f.name)
    rows = [json.loads(line) for line in (data / "forget10_perturbed.json").read_text().splitlines()]
    for stem in ("real_authors_perturbed", "world_facts_perturbed"):
        (data / f"{stem}.json").write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"],
                                                               "perturbed_answer": r["perturbed_answer"][:3]}) + "\n"
                                                   for r in rows))
    out = tmp_path_factory.mktemp("eval")
    summary = evaluate(assets.model_dir, data, "forget10", out_dir=out, **FAST)
    return data, out, summary


def test_pum_writes_open_unlearnings_layout(pum_eval):
    _, out, _ = pum_eval
    mine = json.loads((out / EVAL_FILE).read_text())
    golden = json.loads(GOLDEN.read_text())
    extra = set(mine) - set(golden)
    assert extra == {"pum", "mia_loss", "mia_zlib", "mia_min_k_plus_plus"}  # PUM's provenance, three more attacks
    assert {k: layout(mine[k]) for k in golden} == {k: layout(v) for k, v in golden.items()}
    assert layout(mine["mia_zlib"]) == layout(golden["mia_min_k"])
    assert list(json.loads((out / SUMMARY_FILE).read_text())) == list(SUMMARY_KEYS)


def test_forget_quality_from_open_unlearnings_retain_logs_equals_pums(assets, pum_eval, tmp_path):
    # Prepare: the same retain evaluation twice, as PUM's TOFU_EVAL.json and rewritten by hand into
    # open-unlearning's schema (only the keys its forget_quality and privleak read).
    data_dir, out, _ = pum_eval
    data = load_tofu(data_dir, "forget10")
    pum_logs = read_eval(out)
    theirs = tmp_path / "ou" / EVAL_FILE
    theirs.parent.mkdir()
    ratios = scores(pum_logs, "forget_truth_ratio")
    theirs.write_text(json.dumps({
        "forget_truth_ratio": {"agg_value": metrics.forget_truth_ratio(ratios),
                               "value_by_index": {str(i): {"score": r} for i, r in enumerate(ratios)}},
        "mia_min_k": pum_logs["mia_min_k"],
        "forget_quality": {"agg_value": None},
    }, indent=4))
    model_logs = json.loads(json.dumps(pum_logs))
    model_logs["forget_truth_ratio"]["value_by_index"] = {str(i): {"score": r * (1.5 if i % 2 else 0.5)}
                                                          for i, r in enumerate(ratios)}
    # Execute
    from_pum = summarise(model_logs, reference_eval(out / EVAL_FILE, data, EvalOptions(max_new_tokens=8)))
    from_ou = summarise(model_logs, reference_eval(theirs, data, EvalOptions(max_new_tokens=8)))
    # Assert
    assert from_ou["forget_quality"] == from_pum["forget_quality"] < 1.0
    assert from_ou["privleak"] == from_pum["privleak"] and from_ou["privleak_reference"] == "retain_model"


def test_an_open_unlearning_log_of_another_split_is_refused(assets, pum_eval):
    data_dir, _, _ = pum_eval
    data = load_tofu(data_dir, "forget10")  # six forget questions; the golden file has three
    with pytest.raises(ValueError, match="3 forget truth ratios \\(need 6: another forget split"):
        reference_eval(GOLDEN, data, EvalOptions())


def test_eval_cli_reads_open_unlearnings_retain_logs(assets, pum_eval, tmp_path, capsys):
    from pum.cli import main

    data_dir, out, summary = pum_eval
    model = tmp_path / "model"
    shutil.copytree(assets.model_dir, model)
    code = main(["eval", str(model), "--data", str(data_dir), "--forget-split", "forget10", "--retain-model",
                 str(out / EVAL_FILE), "--max-new-tokens", "8", "--no-progress"])
    assert code == 0
    written = json.loads((model / "evals" / SUMMARY_FILE).read_text())  # MODEL/evals, as open-unlearning
    assert written["forget_quality"] == 1.0  # the same model and data as the retain logs
    assert open_unlearning_summary(summary)["forget_Q_A_Prob"] == pytest.approx(written["forget_Q_A_Prob"])


def test_eval_cli_takes_model_ids_from_the_cache_and_never_writes_into_it(assets, hf_cache, tmp_path, monkeypatch):
    from pum.cli import main

    hf_cache.fill(assets.model_dir, "open-unlearning/tofu_tiny_full")
    hf_cache.fill(assets.model_dir, "open-unlearning/tofu_tiny_retain90")
    monkeypatch.chdir(tmp_path)
    code = main(["eval", "open-unlearning/tofu_tiny_full", "--data", str(assets.data_dir), "--retain-model",
                 "open-unlearning/tofu_tiny_retain90", "--max-new-tokens", "4", "--max-items", "2", "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "saves/eval/open-unlearning_tofu_tiny_full" / SUMMARY_FILE).read_text())
    assert (tmp_path / "saves/eval/open-unlearning_tofu_tiny_retain90" / EVAL_FILE).is_file()  # the retain cache
    assert summary["forget_quality"] == 1.0  # the same weights under both ids
    assert not list(hf_cache.path.rglob("evals"))
