"""TOFU quality benchmark: each inner method run directly (baseline) and through PUM, over seeds.

    python bench/tofu_bench.py                          # the CPU grid, in priority order, resumable
    python bench/tofu_bench.py --splits forget01 --methods NPO --seeds 0 --kappas 0 --copies 4   # a slice
    python bench/tofu_bench.py --report-only            # report.md and the plot from results.json
    python bench/tofu_bench.py --print-models --forget-split forget10   # MODEL_DIR=… for the scripts
    python bench/tofu_bench.py --model-dir M --retain-model-dir R --base-model-dir B --device cuda

Models: without --model-dir, the CPU models of `pum.evaluation.cpu_models` — a base pretrained on
TOFU's real authors and world facts plus synthetic biographies, the target fine-tuned from it on
`full`, a retain model per split fine-tuned on retain99/retain90 (built once, cached). Noise is
relative to the fine-tuning task vector: σ_ℓ = κ·RMS(θ_ℓ − θ_base,ℓ), the base passed to the job.

Grid: for every split, seed and method, the baseline (the method on the target, `run_unlearning`,
what `pum unlearn` does) and PUM at each (m, κ), with the method's rounds R (ROUNDS, overridable by
--rounds NPO=5). Runs go in priority order: baselines and the first (m, κ) of --copies × --kappas
for all seeds and splits, then the next (m, κ), and so on; --max-hours stops starting new ones.

PUM runs in this process (`pum.demo.inprocess`): the real server app and real Worker objects, one
copy per turn, a worker carry folder. Evaluation (`quality_eval`) scores the model in memory:
forget quality against the retain model, model utility, retain utility, forget probability.

results.json (in --out) holds one record per run and is reused: a run already there under the same
options is not run again, so an interrupted benchmark resumes. Several invocations may add to one
results.json at once: writes are locked, and each run is claimed by one live process. --report-only writes report.md and
quality.png from it (`tofu_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality_eval, tofu_report: sibling scripts

log = logging.getLogger("tofu_bench")

REPO = Path(__file__).resolve().parents[1]
SCHEMA = 1
DEFAULT_METHODS = ("GradAscent", "GradDiff", "NPO", "SimNPO", "IdkDPO", "RMU", "UNDIAL")
# Rounds per method as in the authors' scripts (RMU: not in them; one round, like the other non-preference methods).
ROUNDS = {"GradAscent": 1, "GradDiff": 1, "UNDIAL": 1, "RMU": 1, "NPO": 2, "WGA": 2, "SimNPO": 10, "IdkDPO": 10,
          "DPO": 10, "SatImp": 10}
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
# CPU models need a larger learning rate than TOFU's 1e-5 (CPU-NOTES.md); greedy generation is the slow
# part of a CPU evaluation: 32 new tokens instead of 200.
CPU_DEFAULTS = {"lr": 1e-4, "epochs": 5.0, "max_new_tokens": 32}
REAL_DEFAULTS = {"lr": 1e-5, "epochs": 10.0, "max_new_tokens": 200}  # TOFU parity (DESIGN.md §6–7)
RECORD_FIELDS = ("method", "variant", "kappa", "m", "rounds", "seed", "split", "forget_quality", "model_utility",
                 "retain_utility", "forget_prob", "seconds")


def default_data_dir() -> Path:
    return Path(os.environ.get("PUM_TOFU_DATA") or REPO.parent / "shared" / "data" / "tofu")


def parse_rounds(values: list[str]) -> dict[str, int]:
    out = {}
    for value in values:
        method, sep, rounds = value.partition("=")
        if not sep or not rounds.isdigit() or int(rounds) < 1:
            raise argparse.ArgumentTypeError(f"--rounds takes METHOD=R with R ≥ 1 (got {value!r})")
        out[method] = int(rounds)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", nargs="+", default=["forget01", "forget10"], choices=sorted(RETAIN_OF))
    p.add_argument("--forget-split", choices=sorted(RETAIN_OF), help="one split (same as --splits SPLIT)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="inner methods (registry names)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (batch order; PUM's noise)")
    p.add_argument("--kappas", nargs="+", type=float, default=[0.0, 0.01, 0.1], help="relative noise levels κ, in priority order")
    p.add_argument("--copies", nargs="+", type=int, default=[4, 2], help="copies m per round, in priority order")
    p.add_argument("--rounds", nargs="*", default=[], help="per-method rounds, e.g. NPO=5 (defaults: ROUNDS)")
    p.add_argument("--no-baseline", action="store_true", help="PUM runs only")
    p.add_argument("--data", type=Path, default=None, help="TOFU JSON-lines folder (default $PUM_TOFU_DATA or ../shared/data/tofu)")
    p.add_argument("--model-dir", type=Path, help="target model (HF folder); default: the CPU model")
    p.add_argument("--retain-model-dir", type=Path, help="retain model of the (single) split; default: the CPU model")
    p.add_argument("--base-model-dir", type=Path, help="base model the target was fine-tuned from (relative noise)")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "tofu-cpu", help="CPU model cache")
    p.add_argument("--spec", choices=("default", "test", "gpu"), default="default",
                   help="model spec when no --model-dir: CpuModelSpec(), TEST_SPEC or GPU_SPEC (~30 M parameters)")
    p.add_argument("--epochs", type=float, help="baseline epoch budget = PUM local_epochs (CPU 5, real 10)")
    p.add_argument("--lr", type=float, help="learning rate (CPU models 1e-4, real models 1e-5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--hyperparams", default="{}", help='extra trainer keys for every run, JSON, e.g. {"warmup_steps": 2}')
    p.add_argument("--method-params", default="{}", help='per-method parameters, JSON, e.g. {"NPO": {"beta": 0.2}}')
    p.add_argument("--alpha-min", type=float, default=1.0)
    p.add_argument("--alpha-max", type=float, default=2.0)
    p.add_argument("--jitter-tau", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=1, help="Worker objects taking turns on a job's copies")
    p.add_argument("--max-items", type=int, help="first N records of each evaluation split (smoke runs)")
    p.add_argument("--max-new-tokens", type=int, help="greedy generation budget (CPU 32, real 200)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--device", help="training and evaluation device (default cuda if available)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--max-hours", type=float, help="start no new run after this many hours (the report says what ran)")
    p.add_argument("--force", action="store_true", help="redo runs already in results.json")
    p.add_argument("--out", type=Path, default=Path("saves/bench/quality"), help="report folder (results.json, report.md)")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md and the plot from results.json")
    p.add_argument("--print-models", action="store_true", help="print MODEL_DIR=, RETAIN_MODEL_DIR=, BASE_MODEL_DIR= and exit")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.forget_split:
        args.splits = [args.forget_split]
    if args.model_dir is not None and (args.retain_model_dir is None or len(args.splits) != 1):
        p.error("with --model-dir give --retain-model-dir and a single split (--forget-split)")
    for key, value in (CPU_DEFAULTS if args.model_dir is None else REAL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data = args.data or default_data_dir()
    try:
        args.rounds = {**ROUNDS, **parse_rounds(args.rounds)}
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    for name in ("hyperparams", "method_params"):
        value = json.loads(getattr(args, name))
        if not isinstance(value, dict):
            p.error(f"--{name.replace('_', '-')} must be a JSON object")
        setattr(args, name, value)
    if any(k < 0 for k in args.kappas) or any(m < 2 for m in args.copies):
        p.error("every κ must be ≥ 0 and every m ≥ 2")
    return args


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class Models:
    target: Path
    retain: Path
    base: Path | None
    note: str


def resolve_models(args: argparse.Namespace, split: str) -> Models:
    """The given folders, or the CPU models of the split (built once, cached)."""
    if args.model_dir is not None:
        base = args.base_model_dir.resolve() if args.base_model_dir else None
        return Models(args.model_dir.resolve(), args.retain_model_dir.resolve(), base, "given model folders")
    from pum.evaluation.cpu_models import GPU_SPEC, TEST_SPEC, CpuModelSpec, build_tofu_models

    spec = {"test": TEST_SPEC, "gpu": GPU_SPEC}.get(args.spec, CpuModelSpec())
    retain_split = RETAIN_OF[split]
    started = time.perf_counter()
    folders = build_tofu_models(args.data, args.cache_dir, splits=("full", retain_split), spec=spec, progress=False,
                                device=getattr(args, "device", None))
    log.info("CPU models for %s ready in %.0f s: %s", split, time.perf_counter() - started, folders["full"].parent)
    return Models(folders["full"].resolve(), folders[retain_split].resolve(), folders["base"].resolve(),
                  f"CPU models ({args.spec} spec: {spec})")


def model_identity(path: Path | None) -> str | None:
    """Names, sizes and mtimes of the weight and config files: changes when the model does."""
    if path is None:
        return None
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                     if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors"))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Run:
    split: str
    method: str
    seed: int
    variant: str  # "baseline" or "pum"
    kappa: float | None = None
    m: int | None = None
    rounds: int = 1

    @property
    def key(self) -> str:
        if self.variant == "baseline":
            return f"{self.split}/{self.method}/baseline/s{self.seed}"
        return f"{self.split}/{self.method}/pum/k{self.kappa:g}/m{self.m}/R{self.rounds}/s{self.seed}"


def grid(args: argparse.Namespace) -> list[Run]:
    """Every run, in priority order: phase 0 the baselines and the first (m, κ); then each further (m, κ)."""
    phases = [(m, k) for m in args.copies for k in args.kappas]
    runs = []
    for index, (m, kappa) in enumerate(phases):
        for seed in args.seeds:
            for split in args.splits:
                for method in args.methods:
                    if index == 0 and not args.no_baseline:
                        runs.append(Run(split, method, seed, "baseline"))
                    runs.append(Run(split, method, seed, "pum", kappa, m, args.rounds.get(method, 1)))
    return runs


# ---------------------------------------------------------------- results.json


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock beside `path` (several invocations may write one results.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"schema": SCHEMA, "options": None, "commands": [],
                                                                  "models": {}, "references": {}, "records": []}


def write_results(path: Path, results: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Bench:
    args: argparse.Namespace
    options: dict  # everything that changes a run's numbers, other than the run itself
    models: dict[str, Models] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def path(self) -> Path:
        return self.args.out / "results.json"

    def update(self, change) -> dict:
        """Read results.json under the lock, apply `change(results)`, write it back; returns the results.

        Runs made under other options are moved aside with the whole file; a split whose models changed
        loses its references and records (another invocation's splits are kept)."""
        with locked(self.path):
            results = read_results(self.path)
            if results.get("options") not in (None, self.options):
                backup = self.path.with_name(f"results.{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
                self.path.rename(backup)
                log.warning("results.json was made with other options: moved to %s, starting afresh", backup)
                results = read_results(self.path)
            results["options"] = self.options
            for split, identity in self.model_ids.items():
                if results["models"].get(split) not in (None, identity):
                    log.warning("the %s models changed: dropping that split's earlier runs", split)
                    results["references"].pop(split, None)
                    results["records"] = [r for r in results["records"] if r["split"] != split]
                results["models"][split] = identity
            change(results)
            write_results(self.path, results)
        return results

    @property
    def model_ids(self) -> dict[str, dict]:
        return {split: {"target": str(m.target), "target_id": model_identity(m.target), "retain": str(m.retain),
                        "retain_id": model_identity(m.retain), "base_model": str(m.base) if m.base else None,
                        "base_id": model_identity(m.base)} for split, m in sorted(self.models.items())}

    def done(self, key: str) -> bool:
        results = read_results(self.path)
        return any(r["key"] == key and "error" not in r for r in results.get("records", [])) and not self.args.force

    def claim(self, key: str) -> bool:
        """Take `key` for this process unless it is done or a live process holds it: several invocations on
        one split share its runs."""
        taken = []

        def take(results):
            claims = results.setdefault("claims", {})
            holder = claims.get(key)
            done = any(r["key"] == key and "error" not in r for r in results["records"]) and not self.args.force
            if done or (holder not in (None, os.getpid()) and _alive(holder)):
                return
            claims[key] = os.getpid()
            taken.append(key)
        self.update(take)
        return bool(taken)

    def record(self, entry: dict) -> None:
        def add(results):
            results["records"] = [r for r in results["records"] if r["key"] != entry["key"]] + [entry]
            results.get("claims", {}).pop(entry["key"], None)
        self.update(add)

    # ---- hyperparameters and data
    def hyperparams(self, method: str, seed: int) -> dict:
        a = self.args
        return {"lr": a.lr, "batch_size": a.batch_size, "weight_decay": a.weight_decay, "seed": seed,
                **a.hyperparams, **a.method_params.get(method, {})}

    def pairs(self, split: str):
        from pum.common.qa import load_qa

        return load_qa(self.args.data / f"{split}.json"), load_qa(self.args.data / f"{RETAIN_OF[split]}.json")

    def tofu(self, split: str):
        from pum.evaluation.data import load_tofu

        return load_tofu(self.args.data, split, self.args.max_items)

    # ---- evaluation
    def evaluate(self, model, tokenizer, split: str) -> dict:
        from quality_eval import EvalSettings, score_model, summarise

        settings = EvalSettings(batch_size=self.args.eval_batch_size, max_new_tokens=self.args.max_new_tokens)
        retain = read_results(self.path)["references"].get(split, {}).get("retain")
        items = score_model(model, tokenizer, self.tofu(split), settings)
        return summarise(items, retain["forget_truth_ratios"] if retain else None)

    def load(self, path: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path).to(self.device)
        return model, AutoTokenizer.from_pretrained(path)

    @property
    def device(self) -> str:
        import torch

        return self.args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    # ---- the runs
    def references(self, split: str) -> None:
        """The retain model first (every forget quality is against it), then the target and the base."""
        models = self.models[split]
        refs = read_results(self.path)["references"].get(split, {})
        for name, path in (("retain", models.retain), ("target", models.target), ("base", models.base)):
            if path is None or (name in refs and not self.args.force):
                continue
            started = time.perf_counter()
            summary = self.evaluate(*self.load(path), split)
            if name == "retain":
                summary = {**summary, "forget_quality": 1.0, "forget_quality_is_floor": False}
            else:
                summary.pop("forget_truth_ratios")
            summary.update(model_dir=str(path), eval_seconds=time.perf_counter() - started)
            log.info("%s %s: model utility %.4f, forget P %.3f", split, name, summary["model_utility"], summary["forget_prob"])
            self.update(lambda results: results["references"].setdefault(split, {}).__setitem__(name, summary))

    def run(self, run: Run) -> None:
        started = time.perf_counter()
        base = self.models[run.split].base
        entry = {"key": run.key, "method": run.method, "variant": run.variant, "kappa": run.kappa, "m": run.m,
                 "rounds": run.rounds, "seed": run.seed, "split": run.split, "base_model": str(base) if base else None}
        try:
            model, tokenizer, train = (self.baseline if run.variant == "baseline" else self.pum)(run)
            entry["unlearn_seconds"] = time.perf_counter() - started
            evaluated = time.perf_counter()
            summary = self.evaluate(model, tokenizer, run.split)
            summary.pop("forget_truth_ratios")
            entry.update({k: summary[k] for k in ("forget_quality", "forget_quality_is_floor", "model_utility",
                                                  "retain_utility", "forget_prob", "forget_truth_ratio", "components")})
            entry.update(train=train, eval_seconds=time.perf_counter() - evaluated)
            log.info("%s: FQ %.3g, MU %.4f, forget P %.3f (%.0f s)", run.key, entry["forget_quality"],
                     entry["model_utility"], entry["forget_prob"], time.perf_counter() - started)
        except Exception as err:  # one failed run is a record, not the end of the benchmark
            log.exception("%s failed", run.key)
            entry["error"] = f"{type(err).__name__}: {err}"
        entry["seconds"] = time.perf_counter() - started
        entry["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.record(entry)

    def baseline(self, run: Run):
        from pum.client.trainer import TrainConfig, run_unlearning
        from pum.common.schemas import TaskSpec

        task = TaskSpec(method=run.method, epochs=self.args.epochs, rounds=1, hyperparams=self.hyperparams(run.method, run.seed))
        model, tokenizer = self.load(self.models[run.split].target)
        forget, retain = self.pairs(run.split)
        train = run_unlearning(model, tokenizer, forget, retain, TrainConfig.from_task(task))
        return model, tokenizer, train

    def pum(self, run: Run):
        from pum.demo.inprocess import run_job_in_process

        a, models = self.args, self.models[run.split]
        pum = {"copies_m": run.m, "rounds_R": run.rounds, "noise_kappa": run.kappa, "inner_handler": run.method,
               "local_epochs": a.epochs, "alpha_min": a.alpha_min, "alpha_max": a.alpha_max, "jitter_tau": a.jitter_tau,
               "seed": 1000 + run.seed}  # reproducible α and noise per seed (a benchmark, not a deployment)
        if models.base is not None:
            pum["base_model"] = str(models.base)
        forget, retain = self.pairs(run.split)
        task = run.key.replace("/", "_").replace(".", "p")
        work = a.out / "work" / task  # one folder per run: several invocations may share --out
        job = run_job_in_process(models.target, pum, self.hyperparams(run.method, run.seed), forget, retain, work,
                                 task=task, workers=a.workers, device=self.device)
        model, tokenizer = self.load(job.model_dir)
        shutil.rmtree(work, ignore_errors=True)
        return model, tokenizer, {"job_seconds": job.seconds, "rounds": len(job.status.rounds)}


def options_of(args: argparse.Namespace, models: dict[str, Models]) -> dict:
    """Everything that changes the numbers besides the run's own coordinates and its split's models
    (results.json's "models", per split); results.json is reused only when equal."""
    return {
        "models_note": next(iter(models.values())).note if models else None,
        "data": str(args.data.resolve()), "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "weight_decay": args.weight_decay, "hyperparams": args.hyperparams, "method_params": args.method_params,
        "alpha_min": args.alpha_min, "alpha_max": args.alpha_max, "jitter_tau": args.jitter_tau,
        "max_items": args.max_items, "max_new_tokens": args.max_new_tokens, "noise": "relative to θ − θ_base",
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # This script's progress at --log-level; every library (server, worker, httpx) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(args.log_level.upper())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per copy
    import tofu_report

    if args.report_only:
        tofu_report.write(read_results(args.out / "results.json"), args.out)
        return 0
    models = {split: resolve_models(args, split) for split in args.splits}
    if args.print_models:
        m = models[args.splits[0]]
        print(f"MODEL_DIR={shlex.quote(str(m.target))}\nRETAIN_MODEL_DIR={shlex.quote(str(m.retain))}")
        print(f"BASE_MODEL_DIR={shlex.quote(str(m.base)) if m.base else ''}")
        return 0
    from pum.client.methods import get_method

    for method in args.methods:
        get_method(method)  # ValueError listing the registry before anything runs
    bench = Bench(args, options_of(args, models), models)
    command = shlex.join(argv)
    bench.update(lambda r: r["commands"].append(command) if command not in r["commands"] else None)
    for split in args.splits:
        bench.references(split)
    skipped = []
    for run in grid(args):
        if bench.done(run.key):
            continue
        if args.max_hours is not None and time.perf_counter() - bench.started > args.max_hours * 3600:
            skipped.append(run.key)
            continue
        if not bench.claim(run.key):
            continue  # another invocation is running it
        log.info("run %s", run.key)
        bench.run(run)
    if skipped:
        log.warning("--max-hours reached: %d runs not started (the report lists what ran)", len(skipped))
    results = read_results(bench.path)
    tofu_report.write(results, args.out)
    failed = [r["key"] for r in results["records"] if "error" in r]
    if failed:
        log.error("failed runs: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
