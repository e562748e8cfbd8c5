"""The TOFU quality benchmark and the two TOFU scripts, on a small setting.

The data is the real TOFU forget01 split (all 40 forget questions) with a trimmed retain set and
trimmed general-knowledge sets: TEST_SPEC models (base, target, retain99) build in seconds on them.
Evaluation reads the first few records of each split (--max-items) and generates a few tokens. The
benchmark's PUM runs go through the real server app and Worker objects in one process.
The tests that need the CPU models or the benchmark's output (about 30 s of building and running
before the first of them) are marked `slow`: the full suite runs them, `make test-fast` does not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("PUM_TOFU_DATA") or REPO.parent / "shared" / "data" / "tofu")
MAX_ITEMS = 4  # records of each split scored
RETAIN_PAIRS = 160  # retain99 pairs kept: full = forget01 (40) + these
EVAL_SPLITS = ("forget01_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed",
               "real_authors", "world_facts")

pytestmark = pytest.mark.skipif(not (DATA / "forget01.json").is_file(), reason=f"no TOFU data in {DATA}")


def _lines(path: Path, n: int | None = None) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n]


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def small_tofu(tmp_path_factory) -> Path:
    """TOFU forget01 with 160 retain pairs: full, retain99, forget01(+perturbed), holdout, utility and base splits."""
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
    """The TEST_SPEC base, target and retain99 models, built once into a cache the bench and the script share."""
    import torch

    from pum.evaluation.cpu_models import TEST_SPEC, build_tofu_models

    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("tofu-cpu-cache")
    build_tofu_models(small_tofu, cache, splits=("full", "retain99"), spec=TEST_SPEC, progress=False)
    return small_tofu, cache


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, **extra}


def _load(name: str):
    """A script of bench/ as a module (bench/ is a folder of scripts, not a package)."""
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tofu_bench():
    return _load("tofu_bench")


@pytest.fixture(scope="module")
def tofu_report():
    return _load("tofu_report")


def _bench_args(data: Path, cache: Path, out: Path, methods: tuple[str, ...]) -> list[str]:
    return ["--spec", "test", "--data", str(data), "--cache-dir", str(cache), "--splits", "forget01",
            "--methods", *methods, "--seeds", "0", "1", "--kappas", "0", "0.1", "--copies", "2", "--rounds",
            "NPO=2", "--epochs", "2", "--lr", "1e-3", "--max-items", str(MAX_ITEMS), "--max-new-tokens", "4",
            "--threads", "1", "--out", str(out)]


@pytest.fixture(scope="module")
def bench_out(tofu_bench, cpu_models, tmp_path_factory) -> Path:
    """One benchmark: NPO (2 rounds) at κ = 0 and 0.1, two seeds, baselines, all in this process."""
    data, cache = cpu_models
    out = tmp_path_factory.mktemp("bench") / "quality"
    assert tofu_bench.main(_bench_args(data, cache, out, ("NPO",))) == 0
    return out


@pytest.mark.slow
def test_bench_writes_one_record_per_run_with_the_schema(bench_out, tofu_bench):
    results = json.loads((bench_out / "results.json").read_text())
    records = results["records"]
    assert len(records) == 6  # 2 seeds × (baseline, κ = 0, κ = 0.1)
    for record in records:
        assert "error" not in record, record
        assert set(tofu_bench.RECORD_FIELDS) <= set(record)
        assert 0.0 <= record["forget_quality"] <= 1.0 and 0.0 <= record["model_utility"] <= 1.0
        assert record["split"] == "forget01" and record["method"] == "NPO" and record["seconds"] > 0
    pum = [r for r in records if r["variant"] == "pum"]
    assert {(r["kappa"], r["m"], r["rounds"]) for r in pum} == {(0.0, 2, 2), (0.1, 2, 2)}
    assert all(r["train"]["rounds"] == 2 for r in pum)
    assert results["models"]["forget01"]["base_model"].endswith("base")  # κ relative to θ − θ_base
    assert all(r["base_model"] == results["models"]["forget01"]["base_model"] for r in records)
    assert {"retain", "target", "base"} <= set(results["references"]["forget01"])


@pytest.mark.slow
def test_pum_at_kappa_zero_scores_as_the_baseline_seed_by_seed(bench_out):
    """The κ = 0 law, end to end through the benchmark: the same numbers as the baseline of the same seed."""
    records = json.loads((bench_out / "results.json").read_text())["records"]
    for seed in (0, 1):
        base = next(r for r in records if r["variant"] == "baseline" and r["seed"] == seed)
        pum = next(r for r in records if r["variant"] == "pum" and r["kappa"] == 0 and r["seed"] == seed)
        assert pum["forget_prob"] == pytest.approx(base["forget_prob"], rel=1e-4, abs=1e-7)
        assert pum["retain_utility"] == pytest.approx(base["retain_utility"], rel=1e-3, abs=1e-6)
        assert pum["forget_quality"] == pytest.approx(base["forget_quality"], rel=1e-6)


@pytest.mark.slow
def test_bench_report_and_plot(bench_out):
    report = (bench_out / "report.md").read_text()
    assert "## κ = 0, m = 2: PUM against the baseline's seed spread" in report
    assert "## Degradation at κ > 0" in report and "| forget01 | NPO | 2 | 2 | 0.1 | 2 |" in report
    assert "--methods NPO" in report and "max_items = 4" in report
    assert "| forget01 | target |" in report and "| forget01 | base |" in report
    if importlib.util.find_spec("matplotlib"):
        assert (bench_out / "quality.png").stat().st_size > 1000


@pytest.mark.slow
def test_bench_resumes_and_adds_runs(tofu_bench, bench_out, cpu_models):
    """A second invocation keeps every run already in results.json and adds only the new ones."""
    data, cache = cpu_models
    before = {r["key"]: r["finished"] for r in json.loads((bench_out / "results.json").read_text())["records"]}
    args = _bench_args(data, cache, bench_out, ("NPO",))
    args[args.index("--seeds") + 1: args.index("--kappas")] = ["0"]
    assert tofu_bench.main([*args, "--no-baseline", "--copies", "3"]) == 0  # last --copies wins
    results = json.loads((bench_out / "results.json").read_text())
    after = {r["key"]: r["finished"] for r in results["records"]}
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["forget01/NPO/pum/k0.1/m3/R2/s0", "forget01/NPO/pum/k0/m3/R2/s0"]
    assert len(results["commands"]) == 2
    (bench_out / "report.md").unlink()
    assert tofu_bench.main(["--report-only", "--out", str(bench_out)]) == 0
    assert "## κ = 0, m = 3" in (bench_out / "report.md").read_text()


def test_two_invocations_on_other_splits_share_one_results_file(tofu_bench, tmp_path):
    """One process per split writes one results.json: neither moves the other's runs aside; changed models
    drop only their own split's runs."""
    def models(name: str):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
        return tofu_bench.Models(folder, folder, None, "test models")

    def bench(split: str, model: str):
        args = tofu_bench.parse_args(["--splits", split, "--out", str(tmp_path / "out")])
        found = {split: models(model)}
        return tofu_bench.Bench(args, tofu_bench.options_of(args, found), found)

    def add(key: str, split: str):
        return lambda results: results["records"].append({"key": key, "split": split})

    a, b = bench("forget01", "m1"), bench("forget10", "m10")
    a.update(add("x", "forget01"))
    b.update(add("y", "forget10"))
    results = a.update(add("z", "forget01"))
    assert [r["key"] for r in results["records"]] == ["x", "y", "z"] and set(results["models"]) == {"forget01", "forget10"}
    assert not list((tmp_path / "out").glob("results.*.json"))  # nothing moved aside
    assert a.claim("w") and a.claim("w")  # a process may take its own claim again
    b.update(lambda results: results["claims"].__setitem__("v", 2 ** 22 + 12345))  # a dead process's claim
    assert b.claim("v") and not b.claim("x")  # x is done
    b.update(lambda results: results["claims"].__setitem__("u", os.getppid()))  # a live process's claim
    assert not b.claim("u")
    (tmp_path / "m10" / "config.json").write_text('{"changed": 1}')
    results = bench("forget10", "m10").update(lambda results: None)
    assert [r["key"] for r in results["records"]] == ["x", "z"]


def test_grid_runs_in_priority_order(tofu_bench):
    args = tofu_bench.parse_args(["--splits", "forget01", "forget10", "--methods", "NPO", "GradDiff", "--seeds", "0", "1",
                                  "--rounds", "NPO=3"])
    runs = tofu_bench.grid(args)
    assert len(runs) == 2 * 2 * 2 * (1 + 6)
    first = runs[: 2 * 2 * 2 * 2]  # phase 0: baselines and m = 4, κ = 0 of every seed, split and method
    assert {(r.variant, r.kappa, r.m) for r in first} == {("baseline", None, None), ("pum", 0.0, 4)}
    assert [(r.m, r.kappa) for r in runs if r.variant == "pum"][::8] == [(4, 0.0), (4, 0.01), (4, 0.1), (2, 0.0),
                                                                          (2, 0.01), (2, 0.1)]
    assert {r.rounds for r in runs if r.method == "NPO" and r.variant == "pum"} == {3}
    assert {r.rounds for r in runs if r.method == "GradDiff" and r.variant == "pum"} == {1}
    with pytest.raises(SystemExit):
        tofu_bench.parse_args(["--rounds", "NPO=0"])


def _record(method, variant, seed, mu, fq, kappa=None, m=None, rounds=1, prob=0.5):
    return {"key": f"forget10/{method}/{variant}/{kappa}/{m}/s{seed}", "split": "forget10", "method": method,
            "variant": variant, "kappa": kappa, "m": m, "rounds": rounds, "seed": seed, "model_utility": mu,
            "forget_quality": fq, "forget_prob": prob, "retain_utility": mu}


def test_degradation_is_paired_by_seed_and_flags_more_than_one_percent(tofu_report, tmp_path):
    records = []
    for seed, mu in ((0, 0.20), (1, 0.22), (2, 0.24)):
        records.append(_record("NPO", "baseline", seed, mu, 1e-3))
        records.append(_record("NPO", "pum", seed, mu, 1e-3, kappa=0.0, m=4, rounds=2))
        records.append(_record("NPO", "pum", seed, mu * 0.97, 1e-2, kappa=0.1, m=4, rounds=2))
        records.append(_record("GradDiff", "baseline", seed, mu, 1e-5))
        records.append(_record("GradDiff", "pum", seed, mu * 0.995, 1e-5, kappa=0.1, m=4))
    grouped = tofu_report.groups(records)
    deltas = tofu_report.paired(grouped[("forget10", "NPO", "pum", 0.1, 4, 2)],
                                tofu_report.baseline_of(grouped, "forget10", "NPO"))
    assert deltas["mu"] == pytest.approx([-0.03] * 3) and deltas["fq"] == pytest.approx([1.0] * 3)
    table, over = tofu_report.degradation_table(grouped, ["forget10"], ["NPO", "GradDiff"])
    assert over == ["forget10 NPO m=4: -3.0 %"]  # GradDiff lost 0.5 %: not flagged
    assert "-3.00 ± 0.00 %" in table and "+1.00 ± 0.00" in table
    law, outside = tofu_report.law_table(grouped, ["forget10"], ["NPO"], 4)
    assert outside == [] and "| yes |" in law
    text = tofu_report.write({"records": records, "references": {}, "commands": ["--x"], "options": {}}, tmp_path)
    assert "More than 1 % model utility lost at κ = 0.1: forget10 NPO m=4: -3.0 %." in text


@pytest.mark.slow
def test_print_models_gives_shell_assignments(tofu_bench, cpu_models, capsys):
    """What the scripts eval when MODEL_DIR is not set: the cached CPU models' folders, the base included."""
    data, cache = cpu_models
    assert tofu_bench.main(["--print-models", "--spec", "test", "--data", str(data), "--cache-dir", str(cache),
                            "--forget-split", "forget01", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("=", 1)[0] for line in lines] == ["MODEL_DIR", "RETAIN_MODEL_DIR", "BASE_MODEL_DIR"]
    target, retain, base = (Path(line.split("=", 1)[1]) for line in lines)
    assert (target.name, retain.name, base.name) == ("full", "retain99", "base")
    assert all((p / "config.json").is_file() for p in (target, retain, base))


@pytest.mark.slow
def test_cpu_models_start_from_one_base(cpu_models):
    """Target and retain are fine-tuned from the same base weights: their task vectors θ − θ_base are small."""
    import torch
    from safetensors.torch import load_file

    from pum.evaluation.cpu_models import TEST_SPEC, build_tofu_models

    data, cache = cpu_models
    folders = build_tofu_models(data, cache, splits=("full", "retain99"), spec=TEST_SPEC, progress=False)  # cached
    base, target = (load_file(folders[name] / "model.safetensors") for name in ("base", "full"))
    fresh = load_file(folders["retain99"] / "model.safetensors")
    assert any(not torch.equal(base[n], target[n]) for n in base)
    for name in ("base", "full", "retain99"):
        marker = json.loads((folders[name] / "COMPLETE.json").read_text())
        assert math.isfinite(marker["training"]["nll"]) and marker["spec"]["hidden"] == TEST_SPEC.hidden
    assert set(fresh) == set(base)
    assert not [p for p in folders["base"].parent.iterdir() if ".building" in p.name]


@pytest.mark.e2e
@pytest.mark.parametrize("script", ["tofu_unlearn.sh", "tofu_pum.sh", "tofu_common.sh"])
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.e2e
def test_tofu_unlearn_script_end_to_end(tofu_bench, cpu_models, tmp_path):
    """`pum unlearn` then `pum eval` through the script (models given: each extra process costs ~15 s here)."""
    data, cache = cpu_models
    models = tofu_bench.resolve_models(argparse.Namespace(
        model_dir=None, spec="test", data=data, cache_dir=cache), "forget01")
    out = tmp_path / "unlearned"
    env = _env(DATA_DIR=str(data), MODEL_DIR=str(models.target), RETAIN_MODEL_DIR=str(models.retain),
               FORGET_SPLIT="forget01", PUM_INNER_HANDLER="GradAscent", PUM_LOCAL_EPOCHS="1", LR="1e-3",
               MAX_ITEMS=str(MAX_ITEMS), MAX_NEW_TOKENS="4", THREADS="1", OUT_DIR=str(out))
    done = subprocess.run(["bash", str(REPO / "scripts" / "tofu_unlearn.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary = json.loads((out / "evals" / "TOFU_SUMMARY.json").read_text())  # open-unlearning's place and keys
    logs = json.loads((out / "evals" / "TOFU_EVAL.json").read_text())
    assert logs["pum"]["forget_split"] == "forget01" and len(logs["forget_truth_ratio"]["value_by_index"]) == MAX_ITEMS
    assert 0.0 <= summary["forget_quality"] <= 1.0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.e2e
def test_gpu_quality_script_runs_its_pipeline_on_the_cpu(small_tofu, tmp_path):
    """bench/gpu_quality.sh in its tiny mode: the test spec on the CPU, pum imported through the script's link
    folder as on the GPU image, one method at κ = 0 and 0.1; everything the H200 run does but CUDA."""
    out = tmp_path / "gpu"
    env = _env(GPU_QUALITY_TINY="1", GPU_QUALITY_SHIM="1", DATA_DIR=str(small_tofu), OUT_DIR=str(out),
               METHODS="GradDiff", MAX_MINUTES="30", OUT=str(tmp_path / "device-out"))
    (tmp_path / "device-out").mkdir()
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_quality.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "/shim" in done.stderr  # pum came from the link folder
    records = json.loads((out / "results.json").read_text())["records"]
    assert sorted((r["variant"], r["kappa"]) for r in records) == [("baseline", None), ("pum", 0.0), ("pum", 0.1)]
    assert (tmp_path / "device-out" / "gpu_quality_report.md").is_file()


def test_a_model_another_process_is_building_is_left_to_it(tmp_path):
    """cpu_models builds each folder under its own lock: a second builder skips it, then finds it done."""
    from pum.evaluation.cpu_models import _build_folder, _lock

    built = []

    def build(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "COMPLETE.json").write_text("{}")
        built.append(tmp)

    folder = tmp_path / "full"
    with _lock(tmp_path / ".full.lock") as held:  # another builder (flock: one per open file, even in one process)
        assert held and _build_folder(folder, build, blocking=False) is False and not built
    assert _build_folder(folder, build, blocking=False) and (folder / "COMPLETE.json").is_file()
    assert _build_folder(folder, build, blocking=True) and len(built) == 1  # done: not built again
