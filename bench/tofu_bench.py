"""TOFU benchmark: the same inner unlearning method run directly (baseline) and through PUM.

    python bench/tofu_bench.py                                   # CPU models, forget10, 7 methods, κ = 0.01 and 0.1
    python bench/tofu_bench.py --methods NPO --kappas 0.01       # add or redo runs; earlier results are kept
    python bench/tofu_bench.py --no-baseline --kappas 0          # PUM without noise: the control for rounds + merge
    python bench/tofu_bench.py --model-dir M --retain-model-dir R --device cuda   # real Hugging Face models
    python bench/tofu_bench.py --print-models --spec test        # shell assignments MODEL_DIR=… RETAIN_MODEL_DIR=…

For every method: the baseline runs the method on the target model in this process (what
`pum unlearn` does); each PUM run creates a job on a real `pum server` process on loopback and
starts `--workers` real `pum worker` processes (what `scripts/tofu_pum.sh` does), then downloads
the merged model through the admin API. Every model, including the target and the retain model,
is scored with `pum.evaluation.tofu.evaluate` against the retain model (forget quality = KS
p-value of truth ratios; at the fully separated floor it is reported as "≤floor (floor)").

Without --model-dir the tiny Llama models of `pum.evaluation.cpu_models.build_tofu_models`
are used (trained on `full` and on the retain split, cached in --cache-dir). Same model, data,
method, hyperparameters and epoch budget on both sides: PUM runs epochs/R per copy and round.

Report folder (--out, default saves/bench/tofu/): report.md, results.json,
forget_quality_vs_utility.png (when matplotlib is installed), logs/, models/<run>/TOFU_*.json.
results.json is reused: a run already in it under the same settings is not run again (--force
redoes it), so methods can be added or re-run later and the report always covers every run.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("tofu_bench")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ("GradAscent", "GradDiff", "NPO", "SimNPO", "IdkDPO", "RMU", "UNDIAL")
DEFAULT_KAPPAS = (0.01, 0.1)
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
# CPU models (0.8 M parameters) need a larger learning rate than TOFU's 1e-5 (CPU-NOTES.md), and
# greedy generation is the slow part of a CPU evaluation: 32 new tokens instead of 200.
CPU_DEFAULTS = {"lr": 1e-4, "epochs": 5.0, "max_new_tokens": 32}
REAL_DEFAULTS = {"lr": 1e-5, "epochs": 10.0, "max_new_tokens": 200}  # TOFU parity (DESIGN.md §6–7)
UTILITY_COMPONENTS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised",
                      "ra_Q_A_ROUGE", "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")
RETAIN_COMPONENTS = UTILITY_COMPONENTS[:3]
HEADLINE = ("forget_quality", "forget_quality_is_floor", "forget_quality_floor", "forget_truth_ratio",
            "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility", "model_utility_partial", "model_utility_missing",
            *UTILITY_COMPONENTS, "privleak", "extraction_strength", "n_forget", "n_holdout", "notes")
MODEL_FILES = (".safetensors", ".bin", ".pt")


def default_data_dir() -> Path:
    return Path(os.environ.get("PUM_TOFU_DATA") or REPO.parent / "shared" / "data" / "tofu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="inner methods (registry names)")
    p.add_argument("--kappas", nargs="+", type=float, default=list(DEFAULT_KAPPAS), help="PUM relative noise levels κ; 0 runs PUM without noise (a control)")
    p.add_argument("--no-baseline", action="store_true", help="PUM runs only")
    p.add_argument("--forget-split", default="forget10", choices=sorted(RETAIN_OF))
    p.add_argument("--data", type=Path, default=None, help="TOFU JSON-lines folder (default $PUM_TOFU_DATA or ../shared/data/tofu)")
    p.add_argument("--model-dir", type=Path, default=None, help="target model (HF folder); default: the CPU model")
    p.add_argument("--retain-model-dir", type=Path, default=None, help="retain model (HF folder); default: the CPU model")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "tofu-cpu",
                   help="CPU model cache (default .cache/tofu-cpu in the repo)")
    p.add_argument("--spec", choices=("default", "test"), default="default", help="CPU model spec: CpuModelSpec() or TEST_SPEC")
    p.add_argument("--epochs", type=float, default=None, help="baseline epoch budget = PUM local_epochs (CPU 5, real 10)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (CPU models 1e-4, real models 1e-5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--hyperparams", default="{}", help='extra trainer keys for every method, JSON, e.g. {"warmup_steps": 2}')
    p.add_argument("--method-params", default="{}", help='per-method parameters, JSON, e.g. {"NPO": {"beta": 0.2}}')
    p.add_argument("--seed", type=int, default=0, help="training seed (batch order), both sides")
    p.add_argument("--copies", type=int, default=4, help="copies m per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds R")
    p.add_argument("--workers", type=int, default=2, help="worker processes per PUM run")
    p.add_argument("--alpha-min", type=float, default=1.0)
    p.add_argument("--alpha-max", type=float, default=2.0)
    p.add_argument("--jitter-tau", type=float, default=0.0)
    p.add_argument("--pum-seed", type=int, default=None, help="fixes α and noise seeds (reproducible; weakens secrecy)")
    p.add_argument("--max-items", type=int, default=None, help="first N records of each evaluation split (smoke runs)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy generation budget (CPU 32, real 200)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="baseline and evaluation device (default cuda if available)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads of this process")
    p.add_argument("--worker-threads", type=int, default=1, help="torch threads per CPU worker")
    p.add_argument("--pum-timeout", type=float, default=4 * 3600.0, help="seconds a PUM job may take")
    p.add_argument("--keep-models", action="store_true", help="keep the unlearned weights (default: metrics only)")
    p.add_argument("--force", action="store_true", help="redo runs already in results.json")
    p.add_argument("--out", type=Path, default=Path("saves/bench/tofu"), help="report folder")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md and the plot from results.json, run nothing")
    p.add_argument("--print-models", action="store_true", help="build/locate the models, print MODEL_DIR= and RETAIN_MODEL_DIR=, exit")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if (args.model_dir is None) != (args.retain_model_dir is None):
        p.error("give both --model-dir and --retain-model-dir, or neither (CPU models)")
    defaults = CPU_DEFAULTS if args.model_dir is None else REAL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data = args.data or default_data_dir()
    for name in ("hyperparams", "method_params"):
        value = json.loads(getattr(args, name))
        if not isinstance(value, dict):
            p.error(f"--{name.replace('_', '-')} must be a JSON object")
        setattr(args, name, value)
    if any(k < 0 for k in args.kappas):
        p.error("every κ must be ≥ 0 (0 = PUM without noise, a control for the rounds and the merge)")
    return args


# ---------------------------------------------------------------- models


def resolve_models(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """(target, retain, description): the given folders, or the CPU models (built once, cached)."""
    if args.model_dir is not None:
        return args.model_dir.resolve(), args.retain_model_dir.resolve(), "given model folders"
    from pum.evaluation.cpu_models import TEST_SPEC, CpuModelSpec, build_tofu_models

    spec = TEST_SPEC if args.spec == "test" else CpuModelSpec()
    retain_split = RETAIN_OF[args.forget_split]
    started = time.perf_counter()
    log.info("CPU models (%s spec) for %s: building or loading from %s", args.spec, args.forget_split, args.cache_dir)
    folders = build_tofu_models(args.data, args.cache_dir, splits=("full", retain_split), spec=spec, progress=False)
    log.info("CPU models ready in %.0f s: %s", time.perf_counter() - started, folders["full"].parent)
    return folders["full"].resolve(), folders[retain_split].resolve(), f"CPU models ({args.spec} spec: {spec})"


def model_identity(path: Path) -> str:
    """Names, sizes and mtimes of the weight and config files: changes when the model does."""
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                     if p.is_file() and (p.name == "config.json" or p.suffix in MODEL_FILES))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- one benchmark


@dataclass
class Bench:
    args: argparse.Namespace
    target: Path
    retain: Path
    models_note: str
    results: dict = field(default_factory=dict)
    server: object = None  # LocalServer, started by the first PUM run

    @property
    def out(self) -> Path:
        return self.args.out

    @property
    def forget_file(self) -> Path:
        return self.args.data / f"{self.args.forget_split}.json"

    @property
    def retain_file(self) -> Path:
        return self.args.data / f"{RETAIN_OF[self.args.forget_split]}.json"

    def config(self) -> dict:
        """Everything that changes the numbers; results.json is reused only when it is the same."""
        a = self.args
        return {
            "target": str(self.target), "target_id": model_identity(self.target),
            "retain": str(self.retain), "retain_id": model_identity(self.retain),
            "data": str(a.data.resolve()), "forget_split": a.forget_split, "epochs": a.epochs, "lr": a.lr,
            "batch_size": a.batch_size, "weight_decay": a.weight_decay, "hyperparams": a.hyperparams,
            "method_params": a.method_params, "seed": a.seed, "copies_m": a.copies, "rounds_R": a.rounds,
            "alpha_min": a.alpha_min, "alpha_max": a.alpha_max, "jitter_tau": a.jitter_tau, "pum_seed": a.pum_seed,
            "max_items": a.max_items, "max_new_tokens": a.max_new_tokens,
        }

    def hyperparams(self, method: str) -> dict:
        a = self.args
        return {"lr": a.lr, "batch_size": a.batch_size, "weight_decay": a.weight_decay, "seed": a.seed,
                **a.hyperparams, **a.method_params.get(method, {})}

    # ---- results.json
    def load_results(self) -> None:
        path = self.out / "results.json"
        fresh = {"config": self.config(), "runs": {}, "skipped": {}}
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("config") == fresh["config"]:
                fresh["runs"], fresh["skipped"] = old.get("runs", {}), old.get("skipped", {})
                fresh["setup"] = old.get("setup", {})
                log.info("results.json: %d earlier runs under the same settings are kept", len(fresh["runs"]))
            else:
                backup = path.with_name(f"results.{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
                path.rename(backup)
                log.warning("results.json was made with other settings: moved to %s, starting afresh", backup)
        self.results = fresh

    def save_results(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")

    def done(self, run: str) -> bool:
        entry = self.results["runs"].get(run)
        return entry is not None and "error" not in entry and not self.args.force

    # ---- evaluation
    def evaluate(self, model_dir: Path, name: str) -> dict:
        from pum.evaluation.tofu import evaluate

        a = self.args
        started = time.perf_counter()
        summary = evaluate(model_dir, a.data, a.forget_split, self.retain, self.out / "models" / name,
                           batch_size=a.eval_batch_size, max_new_tokens=a.max_new_tokens, progress=False,
                           retain_out_dir=self.out / "models" / "retain", max_items=a.max_items, device=a.device)
        seconds = time.perf_counter() - started
        log.info("%s: forget quality %s, model utility %.4f, forget truth ratio %.4f (evaluated in %.0f s)", name,
                 format_fq(summary), summary["model_utility"], summary["forget_truth_ratio"], seconds)
        return {"summary": {k: summary.get(k) for k in HEADLINE}, "eval_seconds": seconds}

    def record(self, run: str, entry: dict) -> None:
        self.results["runs"][run] = {**entry, "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        self.save_results()

    def drop_weights(self, folder: Path) -> None:
        if self.args.keep_models:
            return
        for path in folder.iterdir():
            if path.is_file() and path.suffix in MODEL_FILES:
                path.unlink()

    # ---- the reference rows
    def run_references(self) -> None:
        # The retain model first: its evaluation is then the cached reference of every other one.
        for run, model_dir in (("retain", self.retain), ("target", self.target)):
            if self.done(run):
                continue
            log.info("evaluating the %s model %s", run, model_dir)
            self.record(run, {"kind": run, "model_dir": str(model_dir), **self.evaluate(model_dir, run)})

    # ---- baseline
    def run_baseline(self, method: str) -> None:
        run = f"baseline/{method}"
        if self.done(run):
            log.info("%s: already in results.json", run)
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pum.client.trainer import TrainConfig, run_unlearning
        from pum.common.qa import load_qa
        from pum.common.schemas import TaskSpec

        a = self.args
        name = f"baseline_{method}"
        folder = self.out / "models" / name
        log.info("%s: %s epochs, lr %g on %s", run, a.epochs, a.lr, self.forget_file.name)
        entry = {"kind": "baseline", "method": method}
        try:
            started = time.perf_counter()
            task = TaskSpec(method=method, epochs=a.epochs, rounds=1, hyperparams=self.hyperparams(method))
            config = TrainConfig.from_task(task)
            device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
            tokenizer = AutoTokenizer.from_pretrained(self.target)
            model = AutoModelForCausalLM.from_pretrained(self.target).to(device)
            retain = load_qa(self.retain_file)
            entry["train"] = run_unlearning(model, tokenizer, load_qa(self.forget_file), retain, config)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            del model
            entry["unlearn_seconds"] = time.perf_counter() - started
            entry.update(self.evaluate(folder, name))
            self.drop_weights(folder)
        except Exception as err:  # one failed run is a row, not the end of the benchmark
            log.exception("%s failed", run)
            entry["error"] = f"{type(err).__name__}: {err}"
        self.record(run, entry)

    # ---- PUM
    def ensure_server(self):
        if self.server is None:
            from pum.demo.cluster import LocalServer

            root = self.out / "pum"
            shutil.rmtree(root, ignore_errors=True)  # a fresh server state for every benchmark invocation
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            self.server = LocalServer(state_dir=root / "state", saves_dir=root / "saves",
                                      admin_token=secrets.token_urlsafe(24), lease_ttl_s=120.0,
                                      log_path=self.out / "logs" / "server.log",
                                      dev=self.args.pum_seed is not None)  # a seeded job needs --dev
            self.server.start()
            log.info("PUM server on %s (log: %s)", self.server.url, self.out / "logs" / "server.log")
        return self.server

    def run_pum(self, method: str, kappa: float) -> None:
        run = f"pum/{method}/k{kappa:g}"
        if self.done(run):
            log.info("%s: already in results.json", run)
            return
        a = self.args
        name = f"pum_{method}_k{kappa:g}"
        entry = {"kind": "pum", "method": method, "kappa": kappa}
        log.info("%s: m=%d, R=%d, %d workers, %s epochs per copy", run, a.copies, a.rounds, a.workers, a.epochs / a.rounds)
        try:
            started = time.perf_counter()
            folder = self.pum_job(method, kappa, name)
            entry["unlearn_seconds"] = time.perf_counter() - started
            entry.update(self.evaluate(folder, name))
            self.drop_weights(folder)
        except Exception as err:
            log.exception("%s failed", run)
            entry["error"] = f"{type(err).__name__}: {err}"
        self.record(run, entry)

    def pum_job(self, method: str, kappa: float, name: str) -> Path:
        """One job through the real server and worker processes; returns the downloaded merged model."""
        import torch

        from pum.client.admin import AdminAPI
        from pum.common.states import END_STATES, JobAction, JobState
        from pum.client.cli import http_client
        from pum.demo.cluster import start_worker

        a = self.args
        server = self.ensure_server()
        pum = {"copies_m": a.copies, "rounds_R": a.rounds, "noise_kappa": kappa, "inner_handler": method,
               "local_epochs": a.epochs, "alpha_min": a.alpha_min, "alpha_max": a.alpha_max, "jitter_tau": a.jitter_tau}
        if a.pum_seed is not None:
            pum["seed"] = a.pum_seed
        task = f"tofu_{a.forget_split}_{name}"
        gpus = torch.cuda.device_count() if a.device != "cpu" else 0
        with http_client(server.url, server.admin_token) as http:
            admin = AdminAPI(http)
            job = admin.create_job(task, str(self.target), pum, self.hyperparams(method)).id
            workers = []
            try:
                for i in range(a.workers):
                    extra = ("--device", f"cuda:{i % gpus}") if gpus else ("--device", "cpu")
                    workers.append(start_worker(
                        server.url, admin.issue_token(job, f"{name}-w{i}"), self.forget_file, self.retain_file,
                        self.out / "pum" / "saves", log_path=self.out / "logs" / f"{name}_worker{i}.log",
                        threads=a.worker_threads, extra_args=extra))
                admin.action(job, JobAction.START)
                deadline = time.monotonic() + a.pum_timeout
                last_round = None
                while True:
                    status = admin.status(job)
                    if status.state in END_STATES:
                        break
                    if status.round != last_round:
                        log.info("%s: job %s round %s of %d", name, job, status.round, a.rounds)
                        last_round = status.round
                    if all(w.poll() is not None for w in workers):
                        admin.action(job, JobAction.ABORT)
                        raise RuntimeError(f"every worker exited while the job was {status.state}; "
                                           f"see {self.out / 'logs'}/{name}_worker*.log")
                    if time.monotonic() > deadline:
                        admin.action(job, JobAction.ABORT)
                        raise TimeoutError(f"job {job} not finished after {a.pum_timeout:g} s")
                    time.sleep(1.0)
                if status.state is not JobState.FINALIZED:
                    raise RuntimeError(f"job {job} ended {status.state}: {status.error}")
                folder = self.out / "models" / name
                shutil.rmtree(folder, ignore_errors=True)
                return admin.download_model(job, folder)
            finally:
                for w in workers:
                    try:
                        w.wait(timeout=60)
                    except Exception:
                        w.kill()
                        w.wait()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


# ---------------------------------------------------------------- report


def folder_of(run: str) -> str:
    """models/<folder> of a run: retain, target, baseline_<method>, pum_<method>_k<κ>."""
    return run.replace("/", "_")


def backfill(results: dict, out: Path) -> None:
    """Summary keys a run recorded by an older version of this script lacks, from its TOFU_SUMMARY.json."""
    for run, entry in results["runs"].items():
        summary = entry.get("summary")
        if summary is None or all(k in summary for k in HEADLINE):
            continue
        path = out / "models" / folder_of(run) / "TOFU_SUMMARY.json"
        if path.is_file():
            full = json.loads(path.read_text())
            summary.update({k: full.get(k) for k in HEADLINE if k not in summary})


def retain_utility(summary: dict) -> float | None:
    """Harmonic mean of the three retain components of model utility (retain P, ROUGE, truth ratio)."""
    values = [summary.get(k) for k in RETAIN_COMPONENTS]
    if any(v is None for v in values):
        return None
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def zero_components(results: dict) -> dict[str, list[str]]:
    """{component: runs} of the utility components that are 0 (they make the harmonic mean 0)."""
    zeros: dict[str, list[str]] = {}
    for run in run_order(results):
        for key in UTILITY_COMPONENTS:
            value = results["runs"][run].get("summary", {}).get(key)
            if value is not None and value <= 0:
                zeros.setdefault(key, []).append(run)
    return zeros


def format_fq(summary: dict | None) -> str:
    if not summary or summary.get("forget_quality") is None:
        return "n/a"
    if summary.get("forget_quality_is_floor"):
        return f"≤{summary['forget_quality_floor']:.2g} (floor)"
    value = summary["forget_quality"]
    if value == 1.0:
        return "1.0"
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"


def format_num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def cells(entry: dict | None) -> list[str]:
    """forget quality, model utility, forget truth ratio of one run."""
    if entry is None:
        return ["—"] * 3
    if "error" in entry:
        return ["failed"] * 3
    s = entry["summary"]
    utility = format_num(s["model_utility"]) + (" (partial)" if s.get("model_utility_partial") else "")
    return [format_fq(s), utility, format_num(s["forget_truth_ratio"])]


def variants(results: dict) -> tuple[list[str], list[float]]:
    """Methods in first-run order, κ values sorted, over every run in results.json."""
    methods, kappas = [], set()
    for entry in results["runs"].values():
        if entry.get("method") and entry["method"] not in methods:
            methods.append(entry["method"])
        if entry.get("kind") == "pum":
            kappas.add(entry["kappa"])
    return methods, sorted(kappas)


def main_table(results: dict) -> str:
    methods, kappas = variants(results)
    runs = results["runs"]
    groups = ["baseline"] + [f"PUM κ={k:g}" for k in kappas]
    head = ["method"] + [f"{g} {m}" for g in groups for m in ("FQ", "MU", "FTR")]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for ref, label in (("target", "target (full, no unlearning)"), ("retain", "retain (reference)")):
        if ref in runs:
            lines.append("| " + " | ".join([label] + cells(runs[ref]) + ["—"] * 3 * len(kappas)) + " |")
    for method in methods:
        row = [method] + cells(runs.get(f"baseline/{method}"))
        for k in kappas:
            row += cells(runs.get(f"pum/{method}/k{k:g}"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def run_order(results: dict) -> list[str]:
    """The references, then per method its baseline and its PUM runs by κ; anything else last."""
    methods, kappas = variants(results)
    wanted = ["retain", "target"] + [run for m in methods
                                     for run in [f"baseline/{m}"] + [f"pum/{m}/k{k:g}" for k in kappas]]
    ordered = [run for run in wanted if run in results["runs"]]
    return ordered + [run for run in results["runs"] if run not in ordered]


def detail_table(results: dict) -> str:
    head = ["run", "forget quality", "model utility", "forget truth ratio", "forget Q_A_Prob", "forget ROUGE",
            "retain Q_A_Prob", "retain-only utility", "privleak", "unlearn s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in run_order(results):
        entry = results["runs"][run]
        if "error" in entry:
            lines.append(f"| {run} | failed: {entry['error'][:120]} |" + " |" * (len(head) - 2))
            continue
        s = entry["summary"]
        lines.append("| " + " | ".join([
            run, *cells(entry), format_num(s["forget_Q_A_Prob"]), format_num(s["forget_Q_A_ROUGE"]),
            format_num(s.get("retain_Q_A_Prob")), format_num(retain_utility(s)), format_num(s.get("privleak"), 2),
            format_num(entry.get("unlearn_seconds"), 0), format_num(entry.get("eval_seconds"), 0)]) + " |")
    return "\n".join(lines)


def total_seconds(results: dict) -> float:
    return sum((e.get("unlearn_seconds") or 0) + (e.get("eval_seconds") or 0) for e in results["runs"].values())


def write_report(results: dict, out: Path, wall_s: float | None, plotted: bool) -> str:
    """report.md from results.json's content: the settings come from its config, not from this invocation."""
    cfg, setup = results["config"], results.get("setup", {})
    split = cfg["forget_split"]
    n_forget = next((e["summary"]["n_forget"] for e in results["runs"].values() if "summary" in e), "?")
    timing = (f"this invocation took {wall_s / 60:.1f} min; " if wall_s is not None else "")
    parts = [
        f"# TOFU {split}: baseline vs PUM",
        "",
        "Commands (results.json keeps every run made under the same settings): "
        + "; ".join(f"`python bench/tofu_bench.py {c}`" for c in setup.get("commands", [""])) + "  ",
        f"Written {datetime.datetime.now():%Y-%m-%d %H:%M}; {timing}the {len(results['runs'])} runs in the report "
        f"took {total_seconds(results) / 60:.1f} min of unlearning and evaluation in all (runs of earlier "
        "invocations under the same settings included; building the CPU models not counted).",
        "",
        "FQ = forget quality (KS p-value of forget truth ratios against the retain model; higher is better, "
        "1.0 = indistinguishable; \"≤x (floor)\" = fully separated samples, a bound, not a measurement), "
        "MU = model utility (harmonic mean of 9), FTR = forget truth ratio (mean min(TR, 1/TR)).",
        "",
        main_table(results),
        "",
        "## Setup",
        "",
        f"- Models: {setup.get('models', 'see config')}; target `{cfg['target']}`, retain `{cfg['retain']}`.",
        f"- Data: `{cfg['data']}`, forget split {split} ({n_forget} forget questions scored), "
        f"retain split {RETAIN_OF[split]}.",
        f"- Unlearning (both sides): {cfg['epochs']:g} epochs budget, lr {cfg['lr']:g}, batch {cfg['batch_size']}, "
        f"weight decay {cfg['weight_decay']:g}, seed {cfg['seed']}, extra {cfg['hyperparams'] or 'none'}, per method "
        f"{cfg['method_params'] or 'none'}; methods at their registry defaults otherwise.",
        f"- PUM: m = {cfg['copies_m']} copies, R = {cfg['rounds_R']} rounds ({cfg['epochs'] / cfg['rounds_R']:g} epochs "
        f"per copy and round), α ∈ [{cfg['alpha_min']:g}, {cfg['alpha_max']:g}], τ = {cfg['jitter_tau']:g}, zero-sum "
        f"relative noise σ_ℓ = κ·RMS(θ_ℓ); {setup.get('workers', '?')} `pum worker` process(es) and one "
        "`pum server` process on loopback.",
        f"- Evaluation: greedy generation capped at {cfg['max_new_tokens']} new tokens"
        + (" (DESIGN.md says 200; cut to keep CPU evaluation short: ROUGE and so model utility depend on it, "
           "truth ratios and forget quality do not)" if cfg["max_new_tokens"] < 200 else "")
        + (f"; max_items = {cfg['max_items']} (a smoke run, not the benchmark)" if cfg["max_items"] else "") + ".",
    ]
    if results.get("skipped"):
        parts.append("- Skipped: " + "; ".join(f"{m}: {why}" for m, why in results["skipped"].items()) + ".")
    zeros = zero_components(results)
    if zeros:
        parts.append("- Model utility is a harmonic mean: one component at 0 makes it 0. Components at 0 here: "
                     + "; ".join(f"{k} in {', '.join(runs)}" for k, runs in zeros.items())
                     + ". The retain-only utility below (harmonic mean of retain Q_A_Prob, ROUGE and truth ratio) "
                       "still separates these runs.")
    parts += ["", "## Every run", "", detail_table(results), ""]
    if plotted:
        parts += ["![forget quality vs model utility](forget_quality_vs_utility.png)", ""]
    else:
        parts += ["(No plot: matplotlib is not installed; `pip install matplotlib`.)", ""]
    text = "\n".join(parts)
    (out / "report.md").write_text(text)
    return text


def plot(results: dict, path: Path) -> bool:
    """forget quality (log) against model utility; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    methods, kappas = variants(results)
    markers = {"baseline": "o", **{k: m for k, m in zip(kappas, "s^vDP*")}}
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for ref, style in (("target", dict(marker="X", color="black")), ("retain", dict(marker="*", color="green"))):
        s = results["runs"].get(ref, {}).get("summary")
        if s and s.get("forget_quality") is not None:
            ax.scatter(s["model_utility"], max(s["forget_quality"], 1e-300), s=140, label=ref, **style)
    for i, method in enumerate(methods):
        for key, label in [("baseline", "baseline"), *[(k, f"PUM κ={k:g}") for k in kappas]]:
            run = f"baseline/{method}" if key == "baseline" else f"pum/{method}/k{key:g}"
            s = results["runs"].get(run, {}).get("summary")
            if not s or s.get("forget_quality") is None:
                continue
            floor = bool(s.get("forget_quality_is_floor"))
            ax.scatter(s["model_utility"], max(s["forget_quality"], 1e-300), marker=markers[key], s=60,
                       facecolors="none" if floor else colors(i % 10), edgecolors=colors(i % 10),
                       label=f"{method} {label}")
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value; hollow = floor)")
    ax.set_title("TOFU: forget quality vs model utility")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main


def finish(results: dict, out: Path, wall_s: float | None) -> None:
    """Plot, report.md, and the table on stdout."""
    plotted = plot(results, out / "forget_quality_vs_utility.png")
    write_report(results, out, wall_s, plotted)
    print(main_table(results))
    print(f"\nreport: {out / 'report.md'}" + (f" ({wall_s / 60:.1f} min)" if wall_s is not None else ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.print_models:
        target, retain, _ = resolve_models(args)
        print(f"MODEL_DIR={shlex.quote(str(target))}\nRETAIN_MODEL_DIR={shlex.quote(str(retain))}")
        return 0
    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        backfill(results, args.out)
        finish(results, args.out, None)
        return 0
    from pum.client.methods import available_methods, get_method

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    target, retain, note = resolve_models(args)
    bench = Bench(args, target, retain, note)
    bench.load_results()
    commands = bench.results.get("setup", {}).get("commands", [])
    command = shlex.join(argv)
    bench.results["setup"] = {"commands": commands + [command] * (command not in commands), "models": note,
                              "workers": args.workers}
    methods = []
    for method in args.methods:
        try:
            get_method(method)
            methods.append(method)
            bench.results["skipped"].pop(method, None)
        except ValueError:
            why = f"not in the method registry yet; registered: {', '.join(available_methods())}"
            log.warning("skipping %s: %s", method, why)
            bench.results["skipped"][method] = why
    try:
        bench.run_references()
        for method in methods:
            if not args.no_baseline:
                bench.run_baseline(method)
            for kappa in args.kappas:
                bench.run_pum(method, kappa)
    finally:
        bench.close()
        bench.save_results()
    backfill(bench.results, args.out)
    finish(bench.results, args.out, time.perf_counter() - started)
    failed = [run for run, e in bench.results["runs"].items() if "error" in e]
    if failed:
        log.error("failed runs: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
