"""report.md and quality.png of the TOFU quality benchmark, from results.json alone.

Degradation of PUM against the baseline, per method, split, m and κ, paired by seed (the same
training seed on both sides):

    ΔMU  = (MU_pum − MU_baseline) / MU_baseline          relative change of model utility
    ΔFQ  = log10 FQ_pum − log10 FQ_baseline               change of log10 forget quality

reported as mean ± sample std over the seeds, beside the baseline's own seed spread (the std over
seeds of MU, relative to its mean, and of log10 FQ). At κ = 0 PUM is "within the baseline's seed
spread" when the mean difference of MU, log10 FQ and forget probability over the seeds run on both
sides is at most the baseline's std of each (plus 1e-6 relative: float32 rounding).
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

METRICS = ("forget_quality", "model_utility", "retain_utility", "forget_prob")


def log10(value: float | None) -> float | None:
    return None if value is None else math.log10(max(value, 1e-300))


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(pair: tuple[float, float], digits: int = 3, percent: bool = False, signed: bool = False) -> str:
    """"mean ± std"; a percentage (×100) or a difference is signed."""
    mean, std = pair
    if math.isnan(mean):
        return "—"
    scale, unit, sign = (100, " %", "+") if percent else (1, "", "+" if signed else "")
    return f"{mean * scale:{sign}.{digits}f} ± {std * scale:.{digits}f}{unit}"


def groups(records: list[dict]) -> dict[tuple, dict[int, dict]]:
    """{(split, method, variant, kappa, m, rounds): {seed: record}} of the successful runs."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in records:
        if "error" not in r:
            out[(r["split"], r["method"], r["variant"], r["kappa"], r["m"], r["rounds"])][r["seed"]] = r
    return out


def baseline_of(grouped: dict, split: str, method: str) -> dict[int, dict]:
    return grouped.get((split, method, "baseline", None, None, 1), {})


def paired(pum: dict[int, dict], base: dict[int, dict]) -> dict[str, list[float]]:
    """Per seed present on both sides: ΔMU (relative), ΔFQ (log10), Δ forget probability, Δ retain utility."""
    deltas: dict[str, list[float]] = defaultdict(list)
    for seed in sorted(set(pum) & set(base)):
        p, b = pum[seed], base[seed]
        if b["model_utility"]:
            deltas["mu"].append((p["model_utility"] - b["model_utility"]) / b["model_utility"])
        deltas["fq"].append(log10(p["forget_quality"]) - log10(b["forget_quality"]))
        deltas["prob"].append(p["forget_prob"] - b["forget_prob"])
        if p.get("retain_utility") is not None and b.get("retain_utility"):
            deltas["ru"].append((p["retain_utility"] - b["retain_utility"]) / b["retain_utility"])
    return deltas


def spread(base: dict[int, dict]) -> dict[str, tuple[float, float]]:
    return {"mu": mean_std([r["model_utility"] for r in base.values()]),
            "fq": mean_std([log10(r["forget_quality"]) for r in base.values()]),
            "prob": mean_std([r["forget_prob"] for r in base.values()]),
            "ru": mean_std([r.get("retain_utility") for r in base.values()])}


def methods_of(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        if r["method"] not in out:
            out.append(r["method"])
    return out


def reference_table(results: dict) -> str:
    lines = ["| split | model | model utility | retain utility | forget P̄ | forget quality | forget truth ratio |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for split, refs in sorted(results.get("references", {}).items()):
        for name in ("base", "target", "retain"):
            s = refs.get(name)
            if s:
                fq = "1 (itself)" if name == "retain" else f"{s['forget_quality']:.2e}"
                lines.append(f"| {split} | {name} | {s['model_utility']:.4f} | {s['retain_utility']:.4f} | "
                             f"{s['forget_prob']:.4f} | {fq} | {s['forget_truth_ratio']:.4f} |")
    return "\n".join(lines)


def law_table(grouped: dict, splits: list[str], methods: list[str], m: int) -> tuple[str, list[str]]:
    """κ = 0 at m copies against the baseline, and the (split, method)s outside the seed spread."""
    lines = ["| split | method | R | seeds | baseline MU | PUM MU | max \\|ΔMU\\| | baseline log10 FQ | PUM log10 FQ | "
             "baseline forget P̄ | PUM forget P̄ | within spread |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    outside = []
    for split in splits:
        for method in methods:
            base = baseline_of(grouped, split, method)
            pums = [(key, runs) for key, runs in grouped.items()
                    if key[:5] == (split, method, "pum", 0.0, m)]
            if not base or not pums:
                continue
            key, pum = pums[0]
            sb, sp = spread(base), spread(pum)
            d = paired(pum, base)
            # Paired by seed (a seed missing on one side would move a mean), with float32's rounding as slack:
            # with one seed the spread is 0 and bit-level differences must not count.
            common = set(pum) & set(base)
            pb, pp = spread({s: base[s] for s in common}), spread({s: pum[s] for s in common})
            within = all(abs(pp[k][0] - pb[k][0]) <= sb[k][1] + 1e-6 * abs(pb[k][0]) + 1e-12
                         for k in ("mu", "fq", "prob"))
            if not within:
                outside.append(f"{split} {method}")
            max_mu = max((abs(x) for x in d["mu"]), default=math.nan)
            lines.append(f"| {split} | {method} | {key[5]} | {len(set(pum) & set(base))} | {fmt(sb['mu'], 4)} | "
                         f"{fmt(sp['mu'], 4)} | {max_mu:.1e} | {fmt(sb['fq'], 2)} | {fmt(sp['fq'], 2)} | "
                         f"{fmt(sb['prob'], 4)} | {fmt(sp['prob'], 4)} | {'yes' if within else '**no**'} |")
    return "\n".join(lines), outside


def degradation_table(grouped: dict, splits: list[str], methods: list[str]) -> tuple[str, list[str]]:
    """ΔMU and ΔFQ at every (m, κ > 0), and the runs degrading model utility by more than 1 % at κ = 0.1."""
    lines = ["| split | method | m | R | κ | seeds | ΔMU (rel.) | ΔFQ (log10) | Δ forget P̄ | baseline MU spread | "
             "baseline log10 FQ spread |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    over = []
    keys = sorted((k for k in grouped if k[2] == "pum" and k[3]), key=lambda k: (splits.index(k[0]) if k[0] in splits else 9,
                                                                                methods.index(k[1]) if k[1] in methods else 99,
                                                                                -k[4], k[3]))
    for split, method, _, kappa, m, rounds in keys:
        base = baseline_of(grouped, split, method)
        pum = grouped[(split, method, "pum", kappa, m, rounds)]
        if not base:
            continue
        d, sb = paired(pum, base), spread(base)
        mu = mean_std(d["mu"])
        if kappa == 0.1 and mu[0] < -0.01:
            over.append(f"{split} {method} m={m}: {mu[0] * 100:+.1f} %")
        rel_spread = sb["mu"][1] / sb["mu"][0] if sb["mu"][0] else math.nan
        lines.append(f"| {split} | {method} | {m} | {rounds} | {kappa:g} | {len(d['fq'])} | {fmt(mu, 2, percent=True)} | "
                     f"{fmt(mean_std(d['fq']), 2, signed=True)} | {fmt(mean_std(d['prob']), 4, signed=True)} | ± {rel_spread * 100:.2f} % | "
                     f"± {sb['fq'][1]:.2f} |")
    return "\n".join(lines), over


def coverage(results: dict) -> str:
    counts: dict[tuple, int] = defaultdict(int)
    failed = []
    for r in results["records"]:
        if "error" in r:
            failed.append(r["key"])
            continue
        label = "baseline" if r["variant"] == "baseline" else f"PUM m={r['m']} κ={r['kappa']:g}"
        counts[(r["split"], label)] += 1
    lines = [f"- {split}, {label}: {n} runs" for (split, label), n in sorted(counts.items())]
    if failed:
        lines.append(f"- failed: {', '.join(failed)}")
    return "\n".join(lines)


def all_runs(results: dict) -> str:
    lines = ["| run | forget quality | model utility | retain utility | forget P̄ | unlearn s | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results["records"], key=lambda r: r["key"]):
        if "error" in r:
            lines.append(f"| {r['key']} | failed: {r['error'][:100]} | | | | | |")
            continue
        fq = f"{r['forget_quality']:.2e}" + (" (floor)" if r.get("forget_quality_is_floor") else "")
        lines.append(f"| {r['key']} | {fq} | {r['model_utility']:.4f} | {r['retain_utility']:.4f} | "
                     f"{r['forget_prob']:.4f} | {r.get('unlearn_seconds', 0):.0f} | {r.get('eval_seconds', 0):.0f} |")
    return "\n".join(lines)


def write(results: dict, out: Path) -> str:
    """Write report.md and quality.png into `out`; returns the report's text."""
    out.mkdir(parents=True, exist_ok=True)
    records, options = results["records"], results.get("options") or {}
    grouped = groups(records)
    splits = sorted({r["split"] for r in records} | set(results.get("references", {})))
    methods = methods_of(records)
    copies = sorted({r["m"] for r in records if r["m"]}, reverse=True)
    plotted = plot(grouped, splits, methods, out / "quality.png")
    hours = sum(r.get("seconds", 0) for r in records) / 3600
    parts = [
        "# TOFU quality: PUM against the baseline, on CPU models",
        "",
        "Commands that produced these runs (results.json keeps every run made under the same options): "
        + "; ".join(f"`python bench/tofu_bench.py {c}`" for c in results.get("commands", [])) + ".  ",
        f"Written {datetime.datetime.now():%Y-%m-%d %H:%M}; {len(records)} runs, {hours:.1f} h of unlearning and "
        "evaluation in all (building the models not counted).",
        "",
        "## Models",
        "",
        f"{options.get('models_note', '')}. The base model is pretrained on TOFU's real authors and world facts "
        "and on synthetic biographies (not TOFU's fictitious authors): the CPU stand-in for a pretrained "
        "model's knowledge. The target is the base fine-tuned on `full`, each retain model the base fine-tuned "
        "on its retain split; PUM's noise is σ_ℓ = κ·RMS(θ_ℓ − θ_base,ℓ), with the base passed to the job.",
        "",
        reference_table(results),
        "",
    ]
    for m in copies:
        table, outside = law_table(grouped, splits, methods, m)
        parts += [f"## κ = 0, m = {m}: PUM against the baseline's seed spread", "",
                  "Mean ± std over seeds. max |ΔMU| is the largest per-seed relative difference of model utility. "
                  "With κ = 0 every copy is the model itself, so PUM with R rounds must reproduce the baseline "
                  "(the κ = 0 law, tested exactly in tests/client/test_kappa_zero_law.py).", "", table, "",
                  f"Outside the spread: {', '.join(outside) if outside else 'none'}.", ""]
    table, over = degradation_table(grouped, splits, methods)
    parts += ["## Degradation at κ > 0", "",
              "Paired by seed (mean ± std over seeds): ΔMU = (MU_pum − MU_base)/MU_base, ΔFQ = log10 FQ_pum − "
              "log10 FQ_base; the baseline's seed spread (std over seeds; MU relative to its mean) beside them. "
              "A higher FQ is better (closer to the retain model); a negative ΔMU is lost utility.", "", table, "",
              "More than 1 % model utility lost at κ = 0.1: " + ("; ".join(over) if over else "none") + ".", ""]
    parts += ["## Setup", "",
              f"- Unlearning, both sides: {options.get('epochs')} epochs budget, lr {options.get('lr')}, batch "
              f"{options.get('batch_size')}, weight decay {options.get('weight_decay')}, gradient clipping at 1.0, "
              f"extra {options.get('hyperparams') or 'none'}, per method {options.get('method_params') or 'none'}.",
              f"- PUM: α ∈ [{options.get('alpha_min')}, {options.get('alpha_max')}], τ = {options.get('jitter_tau')}, "
              "zero-sum noise; the data owner's reference, optimiser state and one LR schedule carry across rounds; "
              "run in one process (the real server app and Worker objects, `pum.demo.inprocess`).",
              f"- Evaluation: greedy generation up to {options.get('max_new_tokens')} new tokens (DESIGN.md: 200; "
              "ROUGE and so model utility depend on it, truth ratios and forget quality do not); forget quality is "
              "the KS p-value of forget truth ratios against the retain model's; the "
              "holdout split is skipped (it feeds only membership inference, not recorded here)"
              + (f"; max_items = {options['max_items']} (a smoke run)" if options.get("max_items") else "") + ".",
              "", "## What ran", "", coverage(results), ""]
    if plotted:
        parts += ["![model utility vs forget quality, and ΔMU](quality.png)", ""]
    parts += ["## Every run", "", all_runs(results), ""]
    text = "\n".join(parts)
    (out / "report.md").write_text(text)
    return text


def plot(grouped: dict, splits: list[str], methods: list[str], path: Path) -> bool:
    """Per split: MU vs log10 FQ (mean ± std over seeds), and ΔMU per method and κ with error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not splits or not methods:
        return False
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(splits), 2, figsize=(14, 5 * len(splits)), squeeze=False)
    for row, split in enumerate(splits):
        left, right = axes[row]
        variants = sorted({(k[3], k[4]) for k in grouped if k[0] == split and k[2] == "pum"},
                          key=lambda v: (-(v[1] or 0), v[0]))
        markers = dict(zip(variants, "s^vDP*<>"))
        for i, method in enumerate(methods):
            series = [("baseline", "o", baseline_of(grouped, split, method))]
            series += [(f"PUM m={m} κ={k:g}", markers[(k, m)], runs) for (s, me, v, k, m, _), runs in grouped.items()
                       if s == split and me == method and v == "pum"]
            for label, marker, runs in series:
                if not runs:
                    continue
                mu = mean_std([r["model_utility"] for r in runs.values()])
                fq = mean_std([log10(r["forget_quality"]) for r in runs.values()])
                left.errorbar(mu[0], fq[0], xerr=mu[1], yerr=fq[1], fmt=marker, color=colors(i % 10), capsize=3,
                              label=f"{method} {label}", alpha=0.85)
        left.set_xlabel("model utility (mean ± std over seeds)")
        left.set_ylabel("log10 forget quality")
        left.set_title(f"TOFU {split}")
        left.legend(fontsize=6, ncol=2)
        width = 0.8 / max(1, len(variants))
        for j, (kappa, m) in enumerate(variants):
            xs, ys, es = [], [], []
            for i, method in enumerate(methods):
                runs = next((r for k, r in grouped.items() if k[:5] == (split, method, "pum", kappa, m)), None)
                if runs:
                    d = mean_std(paired(runs, baseline_of(grouped, split, method))["mu"])
                    xs.append(i + j * width)
                    ys.append(d[0] * 100)
                    es.append(d[1] * 100)
            right.bar(xs, ys, width, yerr=es, capsize=2, label=f"m={m} κ={kappa:g}",
                      hatch="//" if m == min(v[1] for v in variants) and len({v[1] for v in variants}) > 1 else None)
        right.axhline(0, color="black", linewidth=0.5)
        right.axhline(-1, color="red", linewidth=0.5, linestyle="--")
        right.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods, rotation=30, fontsize=8)
        right.set_ylabel("ΔMU, % of the baseline (paired by seed; mean ± std)")
        right.set_title(f"{split}: model utility change, PUM vs baseline (red: −1 %)")
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "saves/bench/quality")
    print(write(json.loads((target / "results.json").read_text()), target))
