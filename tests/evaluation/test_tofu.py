"""`evaluate` end to end on the tiny demo assets, the retain-model cache, and the real TOFU forget01 split."""

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from pum.evaluation import metrics
from pum.evaluation.data import load_tofu
from pum.evaluation.logs import scores
from pum.evaluation.summary import SUMMARY_KEYS as OU_SUMMARY_KEYS
from pum.evaluation.summary import UTILITY_COMPONENTS, open_unlearning_summary, summarise
from pum.evaluation.tofu import EVAL_FILE, SUMMARY_FILE, EvalOptions, evaluate, evaluate_model, reference_eval

# the benchmark data sits in shared/ beside the repository (PUM_TOFU_DATA overrides)
REAL_TOFU = Path(os.environ.get("PUM_TOFU_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tofu")
FAST = dict(max_new_tokens=32, progress=False)
SUMMARY_KEYS = {"forget_quality", "forget_quality_is_floor", "forget_quality_floor", "forget_truth_ratio",
                "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility", "model_utility_partial",
                "model_utility_missing", "extraction_strength", "mia_loss", "mia_zlib", "mia_min_k",
                "mia_min_k_plus_plus", "privleak", "privleak_reference_auc", "privleak_reference", "notes",
                *UTILITY_COMPONENTS}


@pytest.fixture(scope="module")
def random_retain(assets, tmp_path_factory):
    """A 'retain model' that never saw any author: the tiny architecture, freshly initialised."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("random-retain")
    config = LlamaForCausalLM.from_pretrained(str(assets.model_dir), local_files_only=True).config
    torch.manual_seed(123)
    LlamaForCausalLM(config).save_pretrained(str(path))
    assets.load_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def against_random(assets, random_retain, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-vs-random")
    summary = evaluate(assets.model_dir, assets.data_dir, "forget10", retain_model_dir=random_retain, out_dir=out, **FAST)
    return out, summary


def test_retain_model_against_itself_has_forget_quality_one(assets, tmp_path):
    summary = evaluate(assets.model_dir, assets.data_dir, "forget10", retain_model_dir=assets.model_dir,
                       out_dir=tmp_path, **FAST)
    assert summary["forget_quality"] == 1.0 and summary["forget_quality_is_floor"] is False
    assert summary["mia_min_k"] == summary["privleak_reference_auc"] > 0.5  # it saw the forget authors only
    if summary["privleak_reference_auc"] < 1:
        assert summary["privleak"] == 0.0
    else:  # MUSE's AUC 1 − 1 = 0 of the reference: the relative difference is undefined, and said so
        assert summary["privleak"] is None and any("undefined" in note for note in summary["notes"])
    assert (tmp_path / EVAL_FILE).is_file() and (tmp_path / SUMMARY_FILE).is_file()


def test_files_hold_per_item_values_and_aggregates(against_random):
    out, summary = against_random
    written = json.loads((out / SUMMARY_FILE).read_text())
    assert SUMMARY_KEYS <= set(summary) and list(written) == list(OU_SUMMARY_KEYS)
    assert written == json.loads(json.dumps(open_unlearning_summary(summary)))
    logs = json.loads((out / EVAL_FILE).read_text())
    assert logs["pum"]["missing"] == ["real_authors", "world_facts"] and "ra_Q_A_Prob" not in logs
    item = logs["forget_Q_A_ROUGE"]["value_by_index"]["0"]
    assert set(item) == {"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}
    assert len(logs["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["prob"]) == 5
    assert set(logs["mia_min_k"]) == {"forget", "holdout", "auc", "agg_value"}
    assert summary["n_forget"] == len(logs["forget_truth_ratio"]["value_by_index"]) == 6
    assert summary["forget_truth_ratio"] == pytest.approx(metrics.forget_truth_ratio(scores(logs, "forget_truth_ratio")))
    assert logs["forget_quality"] == {"agg_value": summary["forget_quality"]}


def test_missing_utility_splits_are_skipped_and_flagged(against_random):
    _, summary = against_random
    assert summary["model_utility_partial"] is True
    assert summary["model_utility_missing"] == [k for k in UTILITY_COMPONENTS if not k.startswith("retain_")]
    assert summary["model_utility"] == pytest.approx(metrics.harmonic_mean(
        [summary["retain_Q_A_Prob"], summary["retain_Q_A_ROUGE"], summary["retain_Truth_Ratio"]]))
    assert any("real_authors, world_facts" in note for note in summary["notes"])


def test_forget_quality_against_an_unrelated_model_is_low_and_floors_are_marked(against_random):
    _, summary = against_random
    n = summary["n_forget"]
    assert summary["forget_quality"] < 0.1
    assert summary["forget_quality_floor"] == pytest.approx(2 / 924)  # 2 / C(12, 6): D = 1 for n = 6
    assert summary["forget_quality_is_floor"] == metrics.is_ks_floor(summary["forget_quality"], n)
    assert summary["privleak_reference"] == "retain_model"


def test_retain_evaluation_is_cached_and_reused(assets, random_retain, against_random, tmp_path, caplog):
    cached = random_retain / "evals" / EVAL_FILE
    assert cached.is_file() and (random_retain / "evals" / SUMMARY_FILE).is_file()
    before = cached.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="pum.evaluation.tofu"):
        again = evaluate(assets.model_dir, assets.data_dir, "forget10", retain_model_dir=random_retain,
                         out_dir=tmp_path, **FAST)
    assert cached.stat().st_mtime_ns == before and "reusing the retain model's evaluation" in caplog.text
    assert again["forget_quality"] == against_random[1]["forget_quality"]


def test_precomputed_reference_file_is_accepted_and_a_mismatched_one_refused(assets, random_retain, against_random, tmp_path):
    data = load_tofu(assets.data_dir, "forget10")
    doc = reference_eval(random_retain / "evals" / EVAL_FILE, data, EvalOptions())
    assert doc == json.loads((random_retain / "evals" / EVAL_FILE).read_text())
    other = {**doc, "pum": {**doc["pum"], "digests": {**doc["pum"]["digests"], "holdout": "0" * 64}}}
    (tmp_path / EVAL_FILE).write_text(json.dumps(other))
    with pytest.raises(ValueError, match="holdout file differs"):
        reference_eval(tmp_path, data, EvalOptions())
    with pytest.raises(FileNotFoundError):
        reference_eval(tmp_path / "nowhere", data, EvalOptions())


def test_bad_inputs_are_refused_with_a_hint(assets, tmp_path):
    with pytest.raises(ValueError, match="known: forget01, forget05, forget10"):
        load_tofu(assets.data_dir, "forget20")
    for name in ("forget10_perturbed.json", "retain_perturbed.json"):  # no holdout10
        (tmp_path / name).write_bytes((assets.data_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="holdout10"):
        load_tofu(tmp_path, "forget10")
    (tmp_path / "holdout10.json").write_text('{"question": "q?"}')
    with pytest.raises(ValueError, match="record 1 needs a string field 'answer'"):
        load_tofu(tmp_path, "forget10")


@pytest.mark.skipif(not (REAL_TOFU / "forget01_perturbed.json").is_file(), reason="no TOFU data here")
def test_real_tofu_forget01_loads_and_is_scored(loaded):
    data = load_tofu(REAL_TOFU, "forget01")
    assert {role: len(rows) for role, rows in data.records.items()} == {
        "forget": 40, "holdout": 40, "retain": 400, "real_authors": 100, "world_facts": 117}
    assert data.missing == []
    # every forget question in full; a handful of the utility questions to stay fast
    small = dataclasses.replace(data, records={role: rows if role in ("forget", "holdout") else rows[:4]
                                               for role, rows in data.records.items()})
    model, tok = loaded
    logs = evaluate_model(model, tok, small, EvalOptions(max_new_tokens=8))
    ratios = scores(logs, "forget_truth_ratio")
    assert len(ratios) == 40 and all(0 < r < float("inf") for r in ratios)
    assert all(0 < v["prob"] < 1 for v in logs["ra_Q_A_Prob_normalised"]["value_by_index"].values())
    assert all(len(v["prob"]) == 3 for v in logs["ra_Q_A_PERT_Prob"]["value_by_index"].values())
    summary = summarise(logs, logs)
    assert summary["forget_quality"] == 1.0 and summary["forget_quality_floor"] == pytest.approx(1.86e-23, rel=1e-2)
    assert summary["model_utility_partial"] is False and 0 <= summary["model_utility"] <= 1
