"""The TOFU benchmark and the two TOFU scripts, end to end on a small setting.

The data is the real TOFU forget01 split (all 40 forget questions) with a trimmed retain set:
TEST_SPEC models fine-tuned on all 4000 `full` pairs take minutes on a busy 2-core machine, on
200 pairs a few seconds. Evaluation reads the first few records of each split (--max-items) and
generates a few tokens; the PUM run goes through a real server and worker process (those tests
are marked e2e, like tests/e2e/: `make test-fast` leaves them out).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("PUM_TOFU_DATA") or REPO.parent / "shared" / "data" / "tofu")
MAX_ITEMS = 4  # records of each split scored
RETAIN_PAIRS = 160  # retain99 pairs kept: full = forget01 (40) + these
EVAL_SPLITS = ("forget01_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed")

pytestmark = pytest.mark.skipif(not (DATA / "forget01.json").is_file(), reason=f"no TOFU data in {DATA}")


def _lines(path: Path, n: int | None = None) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n]


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def small_tofu(tmp_path_factory) -> Path:
    """TOFU forget01 with 160 retain pairs: full, retain99, forget01(+perturbed), holdout, utility splits."""
    out = tmp_path_factory.mktemp("tofu-small")
    forget, retain = _lines(DATA / "forget01.json"), _lines(DATA / "retain99.json", RETAIN_PAIRS)
    _write(out / "forget01.json", forget)
    _write(out / "retain99.json", retain)
    _write(out / "full.json", forget + retain)
    _write(out / "holdout01.json", _lines(DATA / "holdout01.json"))
    _write(out / "holdout10.json", _lines(DATA / "holdout01.json"))  # the model builder's tokenizer reads it
    for name in EVAL_SPLITS:
        _write(out / f"{name}.json", _lines(DATA / f"{name}.json", 40))
    return out


@pytest.fixture(scope="module")
def cpu_models(small_tofu, tmp_path_factory) -> tuple[Path, Path]:
    """The TEST_SPEC target and retain99 models, built once into a cache the bench and the script share."""
    import torch

    from pum.evaluation.cpu_models import TEST_SPEC, build_tofu_models

    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("tofu-cpu-cache")
    build_tofu_models(small_tofu, cache, splits=("full", "retain99"), spec=TEST_SPEC, progress=False)
    return small_tofu, cache


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, **extra}


@pytest.fixture(scope="module")
def tofu_bench():
    """bench/tofu_bench.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("tofu_bench", REPO / "bench" / "tofu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def _bench_args(data: Path, cache: Path, out: Path, methods: tuple[str, ...]) -> list[str]:
    return ["--spec", "test", "--data", str(data), "--cache-dir", str(cache), "--forget-split", "forget01",
            "--methods", *methods, "--kappas", "0.01", "--epochs", "2", "--lr", "1e-3", "--copies", "2",
            "--rounds", "1", "--workers", "1", "--max-items", str(MAX_ITEMS), "--max-new-tokens", "4",
            "--threads", "1", "--out", str(out)]


@pytest.fixture(scope="module")
def bench_out(tofu_bench, cpu_models, tmp_path_factory) -> Path:
    """One benchmark: in this process (baseline, evaluations), PUM through real server and worker processes."""
    data, cache = cpu_models
    out = tmp_path_factory.mktemp("bench") / "tofu"
    assert tofu_bench.main(_bench_args(data, cache, out, ("GradDiff",))) == 0, (out / "logs")
    return out


@pytest.mark.e2e
def test_bench_writes_report_and_results(bench_out):
    report = (bench_out / "report.md").read_text()
    results = json.loads((bench_out / "results.json").read_text())
    runs = results["runs"]
    assert {"target", "retain", "baseline/GradDiff", "pum/GradDiff/k0.01"} <= set(runs)
    for name, run in runs.items():
        assert "error" not in run, (name, run["error"])
        assert 0.0 <= run["summary"]["forget_quality"] <= 1.0, name
        assert 0.0 <= run["summary"]["model_utility"] <= 1.0, name
        assert run["summary"]["n_forget"] == MAX_ITEMS
    assert runs["retain"]["summary"]["forget_quality"] == 1.0  # the retain model against itself
    assert runs["pum/GradDiff/k0.01"]["unlearn_seconds"] > 0
    assert "| GradDiff |" in report and "PUM κ=0.01 FQ" in report
    assert "| retain (reference) | 1.0 |" in report
    assert f"max_items = {MAX_ITEMS}" in report
    assert "retain-only utility" in report and "--methods GradDiff" in report


@pytest.mark.e2e
def test_bench_reuses_results_and_skips_unknown_methods(tofu_bench, bench_out, cpu_models):
    """A second invocation keeps the runs already in results.json and names a method it cannot run."""
    data, cache = cpu_models
    before = json.loads((bench_out / "results.json").read_text())["runs"]
    assert tofu_bench.main(_bench_args(data, cache, bench_out, ("GradDiff", "NoSuchMethod"))) == 0
    after = json.loads((bench_out / "results.json").read_text())
    assert after["runs"] == before
    assert "NoSuchMethod" in after["skipped"]
    report = (bench_out / "report.md").read_text()
    assert "Skipped: NoSuchMethod: not in the method registry" in report
    assert report.count("`python bench/tofu_bench.py ") == 2 and "GradDiff NoSuchMethod" in report  # both commands
    (bench_out / "report.md").unlink()
    assert tofu_bench.main(["--report-only", "--out", str(bench_out)]) == 0  # from results.json alone
    assert (bench_out / "report.md").read_text().split("\n", 4)[4] == report.split("\n", 4)[4]  # line 3: the time


def test_forget_quality_floor_is_marked(tofu_bench):
    floor = {"forget_quality": 1.94e-119, "forget_quality_is_floor": True, "forget_quality_floor": 1.94e-119}
    assert tofu_bench.format_fq(floor) == "≤1.9e-119 (floor)"
    assert tofu_bench.format_fq({"forget_quality": 0.0123, "forget_quality_is_floor": False}) == "0.0123"
    assert tofu_bench.format_fq({"forget_quality": 1.5e-7, "forget_quality_is_floor": False}) == "1.50e-07"
    assert tofu_bench.format_fq({"forget_quality": None}) == "n/a"
    assert tofu_bench.format_fq({"forget_quality": 1.0, "forget_quality_is_floor": False}) == "1.0"


@pytest.mark.e2e
@pytest.mark.parametrize("script", ["tofu_unlearn.sh", "tofu_pum.sh", "tofu_common.sh"])
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.e2e  # it builds the TEST_SPEC models (about 20 s here), shared with the e2e tests of this file
def test_print_models_gives_shell_assignments(tofu_bench, cpu_models, capsys):
    """What the scripts eval when MODEL_DIR is not set: the cached CPU models' folders."""
    data, cache = cpu_models
    assert tofu_bench.main(["--print-models", "--spec", "test", "--data", str(data), "--cache-dir", str(cache),
                            "--forget-split", "forget01", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("=", 1)[0] for line in lines] == ["MODEL_DIR", "RETAIN_MODEL_DIR"]
    target, retain = (Path(line.split("=", 1)[1]) for line in lines)
    assert target.name == "full" and retain.name == "retain99" and (target / "config.json").is_file()


@pytest.mark.e2e
def test_tofu_unlearn_script_end_to_end(tofu_bench, cpu_models, bench_out, tmp_path):
    """`pum unlearn` then `pum eval` through the script (models given: each extra process costs ~15 s here)."""
    data, cache = cpu_models
    target, retain = tofu_bench.resolve_models(tofu_bench.parse_args(
        ["--spec", "test", "--data", str(data), "--cache-dir", str(cache), "--forget-split", "forget01"]))[:2]
    out = tmp_path / "unlearned"
    env = _env(DATA_DIR=str(data), MODEL_DIR=str(target), RETAIN_MODEL_DIR=str(retain), FORGET_SPLIT="forget01",
               PUM_INNER_HANDLER="GradAscent", PUM_LOCAL_EPOCHS="1", LR="1e-3", MAX_ITEMS=str(MAX_ITEMS),
               MAX_NEW_TOKENS="4", THREADS="1", OUT_DIR=str(out),
               RETAIN_EVAL_DIR=str(bench_out / "models" / "retain"))  # the bench's retain evaluation, reused
    done = subprocess.run(["bash", str(REPO / "scripts" / "tofu_unlearn.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "reusing the retain model's evaluation" in done.stderr
    summary = json.loads((out / "evals" / "TOFU_SUMMARY.json").read_text())  # open-unlearning's place and keys
    logs = json.loads((out / "evals" / "TOFU_EVAL.json").read_text())
    assert logs["pum"]["forget_split"] == "forget01" and len(logs["forget_truth_ratio"]["value_by_index"]) == MAX_ITEMS
    assert 0.0 <= summary["forget_quality"] <= 1.0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
