"""From per-item values (TOFU_EVAL.json's content) to the aggregate metrics (TOFU_SUMMARY.json).

`summarise(doc, reference)` needs the retain model's document as `reference` for forget_quality
(KS test of truth ratios on the forget split) and privleak (min-k AUC relative to the retain
model's); without it forget_quality is None and privleak uses the ideal AUC 0.5, as
open-unlearning does, and the summary says so.
"""

from __future__ import annotations

import numpy as np

from . import metrics

# Model-utility components (open-unlearning's names): name -> (split role, per-item field or aggregator).
UTILITY_COMPONENTS = {
    "retain_Q_A_Prob": ("retain", "prob"),
    "retain_Q_A_ROUGE": ("retain", "rouge_l_recall"),
    "retain_Truth_Ratio": ("retain", "truth_ratio"),
    "ra_Q_A_Prob_normalised": ("real_authors", "normalised_prob"),
    "ra_Q_A_ROUGE": ("real_authors", "rouge_l_recall"),
    "ra_Truth_Ratio": ("real_authors", "truth_ratio"),
    "wf_Q_A_Prob_normalised": ("world_facts", "normalised_prob"),
    "wf_Q_A_ROUGE": ("world_facts", "rouge_l_recall"),
    "wf_Truth_Ratio": ("world_facts", "truth_ratio"),
}
MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
PRIVLEAK_ATTACK = "min_k"  # DESIGN.md §7: privleak from the min-k (k = 0.4) AUC
DEFAULT_REFERENCE_AUC = 0.5  # open-unlearning's ref_value when no retain model is given


def _mean(items: list[dict], key: str) -> float:
    return float(np.mean([item[key] for item in items]))


def _utility_component(items: list[dict] | None, key: str) -> float | None:
    if not items:
        return None
    if key == "truth_ratio":
        return metrics.utility_truth_ratio([item[key] for item in items])
    return _mean(items, key)


def mia_aucs(doc: dict) -> dict[str, float]:
    """AUC of each attack, forget (members) against holdout (non-members)."""
    forget, holdout = doc["splits"]["forget"], doc["splits"]["holdout"]
    return {attack: metrics.auc([i["mia"][attack] for i in forget], [i["mia"][attack] for i in holdout])
            for attack in MIA_ATTACKS}


def check_reference(doc: dict, reference: dict) -> None:
    """Refuse a retain-model document scored on other forget/holdout data or settings than `doc`."""
    problems = []
    for key in ("forget_split", "max_items"):
        if doc.get(key) != reference.get(key):
            problems.append(f"{key} {reference.get(key)!r} (need {doc.get(key)!r})")
    for role in ("forget", "holdout"):
        if doc["digests"].get(role) != reference.get("digests", {}).get(role):
            problems.append(f"the {role} file differs ({reference.get('files', {}).get(role)})")
    if doc["options"].get("min_k") != reference.get("options", {}).get("min_k"):
        problems.append(f"min_k {reference['options'].get('min_k')} (need {doc['options'].get('min_k')})")
    if problems:
        raise ValueError("the retain model's evaluation does not match this one: " + "; ".join(problems)
                         + ". Re-evaluate the retain model on the same data and settings.")


def summarise(doc: dict, reference: dict | None = None) -> dict:
    """Aggregate metrics of one evaluation document; `reference` is the retain model's document."""
    splits = doc["splits"]
    forget = splits["forget"]
    ratios = [item["truth_ratio"] for item in forget]
    notes: list[str] = []
    summary: dict = {"forget_split": doc["forget_split"], "holdout_split": doc["holdout_split"],
                     "n_forget": len(forget), "n_holdout": len(splits["holdout"])}
    if doc.get("max_items") is not None:
        notes.append(f"max_items={doc['max_items']}: every split was cut to its first records (a smoke run, not the benchmark)")

    if reference is not None:
        check_reference(doc, reference)
        ref_ratios = [item["truth_ratio"] for item in reference["splits"]["forget"]]
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
    summary["forget_truth_ratio"] = metrics.forget_truth_ratio(ratios)
    summary["forget_Q_A_Prob"] = _mean(forget, "prob")
    summary["forget_Q_A_ROUGE"] = _mean(forget, "rouge_l_recall")

    components = {name: _utility_component(splits.get(role), key) for name, (role, key) in UTILITY_COMPONENTS.items()}
    utility, missing = metrics.model_utility(components)
    summary.update(model_utility=utility, model_utility_partial=bool(missing), model_utility_missing=missing)
    summary.update(components)
    if doc.get("missing"):
        notes.append(f"splits missing: {', '.join(doc['missing'])}; model_utility is the harmonic mean of the "
                     f"{len(components) - len(missing)} available components, not of {len(components)}")

    summary["extraction_strength"] = _mean(forget, "extraction_strength")
    aucs = mia_aucs(doc)
    summary.update({f"mia_{attack}": value for attack, value in aucs.items()})
    if reference is not None:
        ref_auc, source = mia_aucs(reference)[PRIVLEAK_ATTACK], "retain_model"
    else:
        ref_auc, source = DEFAULT_REFERENCE_AUC, "default_0.5"
        notes.append("no retain model: privleak is relative to the ideal AUC 0.5")
    try:
        leak = metrics.privleak(aucs[PRIVLEAK_ATTACK], ref_auc)
    except ValueError:
        leak = None
        notes.append(f"privleak is undefined: the reference min-k AUC is {ref_auc} (MUSE's AUC 1 − {ref_auc} = 0)")
    summary.update(privleak=leak, privleak_reference_auc=ref_auc, privleak_reference=source)
    summary["notes"] = notes
    return summary
