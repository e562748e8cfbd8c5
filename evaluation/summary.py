"""From the evaluation logs (TOFU_EVAL.json, open-unlearning's layout) to the aggregate metrics.

`summarise(logs, reference)` needs the retain model's logs as `reference` for forget_quality (KS
test of the truth ratios on the forget split) and privleak (min-k AUC relative to the retain
model's); without it forget_quality is None and privleak uses the ideal AUC 0.5, as
open-unlearning does, and the summary says so. The reference may be PUM's logs or
open-unlearning's TOFU_EVAL.json (its `retain_logs_path`): both are read through the same keys,
`forget_truth_ratio` and `mia_min_k`.

TOFU_SUMMARY.json is `open_unlearning_summary(summary)`: metric name → aggregate value, as
open-unlearning writes it. The returned summary adds PUM's annotations (floors, partial utility,
notes), which go into TOFU_EVAL.json under `pum`.
"""

from __future__ import annotations

from . import metrics
from .logs import PUM_KEY, agg, items, scores

# Model-utility components, open-unlearning's names (DESIGN.md §7).
UTILITY_COMPONENTS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised",
                      "ra_Q_A_ROUGE", "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")
MIA_METRICS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")
SUMMARY_KEYS = ("forget_quality", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility",
                *UTILITY_COMPONENTS, "privleak", "extraction_strength", *MIA_METRICS)
PRIVLEAK_ATTACK = "mia_min_k"  # DESIGN.md §7: privleak from the min-k (k = 0.4) AUC
DEFAULT_REFERENCE_AUC = 0.5  # open-unlearning's ref_value when no retain model is given


def open_unlearning_summary(summary: dict) -> dict:
    """TOFU_SUMMARY.json's content: open-unlearning's metric names and aggregate values only."""
    return {key: summary.get(key) for key in SUMMARY_KEYS}


def check_reference(logs: dict, reference: dict) -> None:
    """Refuse a retain model's logs scored on other forget/holdout data or settings than `logs`.

    PUM's logs carry data fingerprints and options, checked in full. open-unlearning's carry none:
    only the number of forget questions can be checked (forget01/05/10 have 40/200/400).
    """
    problems = []
    mine, theirs = logs.get(PUM_KEY, {}), reference.get(PUM_KEY)
    if theirs is None:
        n_mine, n_theirs = len(logs["forget_truth_ratio"]["value_by_index"]), len(scores(reference, "forget_truth_ratio"))
        if n_mine != n_theirs:
            problems.append(f"it has {n_theirs} forget truth ratios (need {n_mine}: another forget split?)")
    else:
        for key in ("forget_split", "max_items"):
            if mine.get(key) != theirs.get(key):
                problems.append(f"{key} {theirs.get(key)!r} (need {mine.get(key)!r})")
        for role in ("forget", "holdout"):
            if mine.get("digests", {}).get(role) != theirs.get("digests", {}).get(role):
                problems.append(f"the {role} file differs ({theirs.get('files', {}).get(role)})")
        if mine.get("options", {}).get("min_k") != theirs.get("options", {}).get("min_k"):
            problems.append(f"min_k {theirs.get('options', {}).get('min_k')!r} (need {mine.get('options', {}).get('min_k')!r})")
        if "prompt_format" in mine and mine["prompt_format"] != theirs.get("prompt_format"):
            problems.append(f"prompt format {theirs.get('prompt_format')!r} (need {mine['prompt_format']!r})")
    if problems:
        raise ValueError("the retain model's evaluation does not match this one: " + "; ".join(problems)
                         + ". Re-evaluate the retain model on the same data and settings.")


def summarise(logs: dict, reference: dict | None = None) -> dict:
    """Aggregate metrics of one model's logs; `reference` is the retain model's logs (PUM's or open-unlearning's)."""
    pum = logs.get(PUM_KEY, {})
    ratios = scores(logs, "forget_truth_ratio")
    notes: list[str] = []
    mia = logs.get(PRIVLEAK_ATTACK)
    summary: dict = {"forget_split": pum.get("forget_split"), "holdout_split": pum.get("holdout_split"),
                     "n_forget": len(ratios), "n_holdout": len(items(mia, "holdout")) if mia else None}
    if pum.get("max_items") is not None:
        notes.append(f"max_items={pum['max_items']}: every split was cut to its first records (a smoke run, not the benchmark)")

    if reference is not None:
        check_reference(logs, reference)
        ref_ratios = scores(reference, "forget_truth_ratio")
        p = metrics.ks_pvalue(ratios, ref_ratios)
        floor = metrics.ks_floor(len(ratios), len(ref_ratios))
        summary.update(forget_quality=p, forget_quality_is_floor=metrics.is_ks_floor(p, len(ratios), len(ref_ratios)),
                       forget_quality_floor=floor)
        if summary["forget_quality_is_floor"]:
            notes.append(f"forget_quality is the floor {floor:.3g} for n={len(ratios)}: the truth-ratio samples are "
                         "fully separated; it is a bound, not a measurement")
    else:
        summary.update(forget_quality=None, forget_quality_is_floor=None,
                       forget_quality_floor=metrics.ks_floor(len(ratios)))
        notes.append("no retain model: forget_quality is None")
    for key in ("forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE"):
        summary[key] = agg(logs, key)

    components = {name: agg(logs, name) for name in UTILITY_COMPONENTS}
    utility, missing = metrics.model_utility(components)
    summary.update(model_utility=utility, model_utility_partial=bool(missing), model_utility_missing=missing)
    summary.update(components)
    if pum.get("missing"):
        notes.append(f"splits missing: {', '.join(pum['missing'])}; model_utility is the harmonic mean of the "
                     f"{len(components) - len(missing)} available components, not of {len(components)}")

    summary["extraction_strength"] = agg(logs, "extraction_strength")
    summary.update({name: agg(logs, name) for name in MIA_METRICS})
    ref_auc = agg(reference, PRIVLEAK_ATTACK) if reference is not None else None
    source = "retain_model"
    if ref_auc is None:
        ref_auc, source = DEFAULT_REFERENCE_AUC, "default_0.5"
        notes.append("no retain model min-k AUC: privleak is relative to the ideal AUC 0.5")
    try:
        leak = None if summary[PRIVLEAK_ATTACK] is None else metrics.privleak(summary[PRIVLEAK_ATTACK], ref_auc)
    except ValueError:
        leak = None
        notes.append(f"privleak is undefined: the reference min-k AUC is {ref_auc} (MUSE's AUC 1 − {ref_auc} = 0)")
    if summary[PRIVLEAK_ATTACK] is None:
        notes.append(f"no {PRIVLEAK_ATTACK} in the logs: privleak is None")
    summary.update(privleak=leak, privleak_reference_auc=ref_auc, privleak_reference=source)
    summary["notes"] = notes
    return summary
