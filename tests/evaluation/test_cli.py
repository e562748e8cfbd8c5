"""`pum eval`, through a parser built the way cli/__init__.py builds it."""

import argparse
import json
from pathlib import Path

import pytest

from pum.evaluation.cli import add_parser, format_summary
from pum.evaluation.tofu import SUMMARY_FILE


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="pum")
    add_parser(root.add_subparsers(dest="role", required=True))
    return root


def test_arguments_and_defaults():
    args = parser().parse_args(["eval", "m", "--data", "d", "--retain-model", "r"])
    assert (args.model_dir, args.data, args.retain_model) == ("m", "d", "r")  # folders or Hugging Face ids
    assert (args.forget_split, args.out, args.batch_size, args.max_new_tokens) == ("forget10", None, 32, 200)
    assert args.prompt_format == "auto"
    with pytest.raises(SystemExit):
        parser().parse_args(["eval", "m", "--data", "d", "--prompt-format", "llama"])
    with pytest.raises(SystemExit):
        parser().parse_args(["eval", "m", "--data", "d", "--forget-split", "forget20"])


def test_eval_prints_the_summary_and_writes_it(assets, tmp_path, capsys):
    args = parser().parse_args(["eval", str(assets.model_dir), "--data", str(assets.data_dir), "--forget-split",
                                "forget01", "--retain-model", str(assets.model_dir), "--out", str(tmp_path),
                                "--max-new-tokens", "8", "--max-items", "3", "--no-progress"])
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["forget_quality"] == 1.0 and "n_forget" not in summary  # open-unlearning's keys only
    assert "forget_quality" in printed and "model_utility" in printed and "partial: without ra_Q_A_Prob_normalised" in printed
    assert "max_items=3" in printed


def test_format_summary_marks_floors():
    summary = {"forget_split": "forget10", "n_forget": 400, "n_holdout": 400, "forget_quality": 1.06e-239,
               "forget_quality_is_floor": True, "model_utility": 0.5, "model_utility_partial": False, "notes": []}
    text = format_summary(summary)
    assert "1.06e-239 (floor: fully separated)" in text and "privleak" in text and "n/a" in text
