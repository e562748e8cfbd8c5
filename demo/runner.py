"""`pum demo`: the whole story on the offline tiny model, end to end over real HTTP.

1. Build (or load from the cache) the fictitious-author data and the fine-tuned tiny model.
2. Measure forget- and retain-set answer probability before unlearning.
3. Baseline: the same inner method run directly on the model (no PUM).
4. PUM: a real server and worker processes on loopback run the job (m copies, R rounds).
5. Print the table and write saves/demo/summary.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pum.client.admin import AdminAPI
from pum.client.cli import http_client
from pum.client.trainer import TrainConfig, run_unlearning
from pum.common.qa import QAPair, mean_answer_probability
from pum.common.schemas import JobStatus
from pum.common.states import JobAction, JobState

from .assets import DemoAssets, build_or_load
from .cluster import LocalServer, start_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    out_dir: Path = Path("saves/demo")  # summary.json, logs, the server's state and the merged model
    cache_dir: Path | None = None  # demo assets cache (None: $PUM_CACHE_DIR or ~/.cache/pum)
    method: str = "GradDiff"  # inner unlearning method, for the baseline and the workers alike
    copies_m: int = 4
    rounds_R: int = 2
    noise_kappa: float = 0.01  # relative noise: σ_ℓ = κ·RMS(θ_ℓ) (the demo model has no base); 0 = the baseline exactly
    jitter_tau: float = 0.0  # std τ of the independent per-copy jitter (it does not cancel in the merge)
    epochs: float = 5.0  # the baseline's budget; PUM copies run epochs/R per round (auto-balancing)
    lr: float = 1e-4  # forget P 0.95 → ~0.6 in 5 epochs with retain P kept ~0.97; 2e-4 starts to hurt retain
    batch_size: int = 32
    workers: int = 2
    forget_split: str = "forget10"
    retain_split: str = "retain90"
    eval_retain_pairs: int = 400  # retain pairs scored (a spread sample), to keep evaluation short
    seed: int = 0
    # DP instead of relative noise: σ_ℓ (and with dp_target true_release the jitter τ_ℓ) calibrated to
    # (dp_epsilon, 1e-5) over the rounds, center clipped around the model's random initialisation (its
    # public base) with C_ℓ = the fine-tuned model's own distance to it, so nothing is clipped and the
    # run measures what the noise costs (C_ℓ read from the private model: a measurement, not a guarantee).
    dp_epsilon: float | None = None
    dp_target: str | None = None  # true_release | seed_formula (None: the server's default)
    # torch threads in this process (the workers take one each). One thread: with any other busy
    # process on the machine, two OpenMP threads per process make a step 10–40× slower (CPU-NOTES.md).
    threads: int = 1


def spread_sample(pairs: list[QAPair], n: int) -> list[QAPair]:
    """Every k-th pair, so the sample covers all authors."""
    step = max(len(pairs) // n, 1)
    return pairs[::step][:n]


def measure(model, tokenizer, forget: list[QAPair], retain: list[QAPair]) -> dict[str, float]:
    return {
        "forget_prob": mean_answer_probability(model, tokenizer, forget),
        "retain_prob": mean_answer_probability(model, tokenizer, retain),
    }


def run_baseline(assets: DemoAssets, options: DemoOptions, forget, retain) -> tuple[dict, float]:
    model, tokenizer = assets.load_model(), assets.load_tokenizer()
    config = TrainConfig(
        method=options.method, lr=options.lr, batch_size=options.batch_size, epochs=options.epochs, seed=options.seed
    )
    started = time.perf_counter()
    run_unlearning(model, tokenizer, forget, retain, config, progress=True)
    return measure(model, tokenizer, forget, spread_sample(retain, options.eval_retain_pairs)), time.perf_counter() - started


def run_pum(assets: DemoAssets, options: DemoOptions) -> tuple[Path, float]:
    """Run the job through a real server and worker processes; returns the merged model folder."""
    out = options.out_dir.resolve()
    shutil.rmtree(out / "state", ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    server = LocalServer(state_dir=out / "state", saves_dir=out / "unlearn", log_path=out / "logs" / "server.log")
    with server, http_client(server.url, server.admin_token) as http:
        admin = AdminAPI(http)
        pum = {
            "copies_m": options.copies_m, "rounds_R": options.rounds_R, "inner_handler": options.method,
            "local_epochs": options.epochs, "jitter_tau": options.jitter_tau,
            **(dp_settings(assets, options, out) if options.dp_epsilon else {"noise_kappa": options.noise_kappa}),
        }
        hyperparams = {"lr": options.lr, "batch_size": options.batch_size, "seed": options.seed}
        job = admin.create_job("demo_" + options.forget_split, str(assets.model_dir), pum, hyperparams).id
        workers = [
            start_worker(
                server.url, admin.issue_token(job, f"demo-worker-{i}"), assets.split(options.forget_split),
                assets.split(options.retain_split), out / "unlearn", log_path=out / "logs" / f"worker{i}.log",
            )
            for i in range(options.workers)
        ]
        try:
            admin.action(job, JobAction.START)
            status = wait_while_workers_live(admin, job, workers, out / "logs")
            if status.state is not JobState.FINALIZED:
                raise RuntimeError(f"PUM job ended {status.state}: {status.error}; see {out / 'logs'}")
            model_dir = admin.download_model(job, out / "pum_model")
            (out / "privacy.json").write_text(http.get(f"/v1/jobs/{job}/privacy").text)
        finally:
            for worker in workers:
                try:
                    worker.wait(timeout=30)
                except Exception:
                    worker.kill()
    return model_dir, time.perf_counter() - started


def wait_while_workers_live(admin: AdminAPI, job: str, workers, logs: Path, timeout_s: float = 1800.0) -> JobStatus:
    """The job's final status; RuntimeError as soon as every worker has exited with the job unfinished."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return admin.wait(job, timeout_s=5.0)
        except TimeoutError:
            if all(w.poll() is not None for w in workers) or time.monotonic() > deadline:
                raise RuntimeError(f"PUM job {job} unfinished and every worker stopped (or timed out); see {logs}") \
                    from None


def dp_settings(assets: DemoAssets, options: DemoOptions, out: Path) -> dict:
    """DP job settings: the random initialisation as public base, C_ℓ = ‖θ_ℓ − θ_base,ℓ‖ (see DemoOptions)."""
    from transformers import LlamaConfig

    from pum.common.layers import GLOBAL_GROUP, group_names, layer_group

    from .tiny_model import build_model

    base = build_model(LlamaConfig.from_pretrained(assets.model_dir), seed=assets.params["spec"]["init_seed"])
    base.save_pretrained(out / "base")
    theta, init = assets.load_model().state_dict(), base.state_dict()
    sums: dict[str, float] = {}
    for name, tensor in theta.items():
        sums[layer_group(name)] = sums.get(layer_group(name), 0.0) + float((tensor - init[name]).double().pow(2).sum())
    layers = [g for g in group_names(theta) if g != GLOBAL_GROUP]
    return {"dp_epsilon": options.dp_epsilon, "base_model": str(out / "base"),
            "center_clip_C_per_layer": [sums[g] ** 0.5 for g in layers], "center_clip_C_global": sums[GLOBAL_GROUP] ** 0.5,
            **({"dp_target": options.dp_target} if options.dp_target else {})}


def run_demo(options: DemoOptions = DemoOptions()) -> dict:
    from transformers import AutoModelForCausalLM

    timings: dict[str, float] = {}
    started = time.perf_counter()
    torch.set_num_threads(options.threads)
    assets = build_or_load(options.cache_dir, threads=options.threads)
    timings["assets"] = time.perf_counter() - started
    tokenizer = assets.load_tokenizer()
    forget, retain = assets.pairs(options.forget_split), assets.pairs(options.retain_split)
    retain_eval = spread_sample(retain, options.eval_retain_pairs)

    t = time.perf_counter()
    before = measure(assets.load_model(), tokenizer, forget, retain_eval)
    timings["evaluate_before"] = time.perf_counter() - t
    baseline, timings["baseline"] = run_baseline(assets, options, forget, retain)
    model_dir, timings["pum"] = run_pum(assets, options)
    pum_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pum = measure(pum_model, tokenizer, forget, retain_eval)
    timings["total"] = time.perf_counter() - started

    privacy = json.loads((options.out_dir / "privacy.json").read_text())
    summary = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "privacy": {k: privacy.get(k) for k in ("epsilon", "unbounded", "no_epsilon_reasons", "sigmas", "taus")}
        | {"seed_formula_epsilon": privacy["seed_formula"]["epsilon"]},
        "assets": {"model_dir": str(assets.model_dir), "built_now": assets.built},
        "before": before, "baseline": baseline, "pum": pum, "seconds": timings,
        "checks": checks(before, baseline, pum),
    }
    options.out_dir.mkdir(parents=True, exist_ok=True)
    (options.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def checks(before: dict, baseline: dict, pum: dict) -> dict:
    """The demo's acceptance figures: PUM keeps ≥ 80% of the baseline's forgetting, and its
    retain probability stays within 0.05 of the baseline's."""
    baseline_drop = before["forget_prob"] - baseline["forget_prob"]
    pum_drop = before["forget_prob"] - pum["forget_prob"]
    ratio = pum_drop / baseline_drop if baseline_drop > 0 else float("nan")
    gap = abs(pum["retain_prob"] - baseline["retain_prob"])
    return {
        "forget_drop_ratio": ratio, "retain_gap": gap, "forget_gap": abs(pum["forget_prob"] - baseline["forget_prob"]),
        "forget_drop_ok": ratio >= 0.8, "retain_gap_ok": gap <= 0.05,
    }


def format_table(summary: dict) -> str:
    rows = [("before", summary["before"]), ("baseline (no PUM)", summary["baseline"]), ("PUM", summary["pum"])]
    lines = [f"{'model':<20}{'forget P(a|q)':>15}{'retain P(a|q)':>15}", "-" * 50]
    lines += [f"{name:<20}{r['forget_prob']:>15.4f}{r['retain_prob']:>15.4f}" for name, r in rows]
    c = summary["checks"]
    lines += [
        "",
        f"PUM forget drop / baseline forget drop = {c['forget_drop_ratio']:.3f} (want ≥ 0.8: {'ok' if c['forget_drop_ok'] else 'NO'})",
        f"|retain PUM − retain baseline|       = {c['retain_gap']:.4f} (want ≤ 0.05: {'ok' if c['retain_gap_ok'] else 'NO'})",
        f"|forget PUM − forget baseline|       = {c['forget_gap']:.4f} (κ = 0 reproduces the baseline: ≈ 0)",
        "",
        "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()),
        f"privacy: headline ε {summary['privacy']['epsilon']} (seed formula "
        f"{summary['privacy']['seed_formula_epsilon']}); see {Path(summary['options']['out_dir']) / 'privacy.json'}",
    ]
    return "\n".join(lines)
