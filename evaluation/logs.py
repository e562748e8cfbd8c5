"""open-unlearning's TOFU_EVAL.json layout, which `pum eval` writes and reads (its own, or open-unlearning's).

    {"forget_Q_A_Prob":      {"agg_value": 0.41, "value_by_index": {"0": {"prob": 0.52, "avg_loss": 0.65}, …}},
     "forget_Q_A_PERT_Prob": {"agg_value": …, "value_by_index": {"0": {"prob": [5 values], "avg_loss": [5 values]}}},
     "forget_truth_ratio":   {"agg_value": …, "value_by_index": {"0": {"score": TR}}},
     "forget_Q_A_ROUGE":     {"agg_value": …, "value_by_index": {"0": {"rouge1_recall", "rougeL_f1", "rougeL_recall",
                                                                        "input", "ground_truth", "generation"}}},
     "mia_min_k":            {"forget": {"agg_value", "value_by_index": {"0": {"score"}}}, "holdout": {…},
                              "auc": …, "agg_value": …},
     "forget_quality" | "model_utility" | "privleak": {"agg_value": …}, …}

Per split, with prefix forget / retain / ra (real authors) / wf (world facts): `{p}_Q_A_Prob`,
`{p}_Q_A_PERT_Prob`, `{p}_Q_A_ROUGE`, the truth ratio (`forget_truth_ratio`, `retain_Truth_Ratio`,
`ra_Truth_Ratio`, `wf_Truth_Ratio`: TR = wrong/correct, open-unlearning's orientation),
`{p}_Q_A_PARA_Prob` (forget, retain) and `{p}_Q_A_Prob_normalised` (ra, wf); then
`extraction_strength` and `mia_{loss,zlib,min_k,min_k_plus_plus}` on forget against holdout.
Keys of `value_by_index` are each record's index in its split file, as strings (json.dump of
open-unlearning's int keys). PUM adds one key open-unlearning ignores, `pum`: the data
fingerprints, options and model stamp that its cache and reference checks need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
PUM_KEY = "pum"


def truth_ratio_key(role: str) -> str:
    return "forget_truth_ratio" if role == "forget" else f"{PREFIX[role]}_Truth_Ratio"


def metric(values: Sequence[dict], aggregate: Callable[[list[dict]], float]) -> dict:
    """{"agg_value": aggregate(values), "value_by_index": {"0": values[0], …}}."""
    values = list(values)
    return {"agg_value": float(aggregate(values)), "value_by_index": {str(i): v for i, v in enumerate(values)}}


def mean_of(field: str) -> Callable[[list[dict]], float]:
    """Mean over items of `field` (of its mean, for a list field: open-unlearning's aggregate_to_1D)."""
    return lambda values: float(np.mean([np.mean(v[field]) for v in values]))


def items(logs: dict, name: str) -> list[dict]:
    """The per-item values of metric `name`, in index order; KeyError naming the metric when absent."""
    try:
        by_index = logs[name]["value_by_index"]
    except (KeyError, TypeError):
        raise KeyError(f"the evaluation has no per-item values for {name!r}") from None
    return [by_index[key] for key in sorted(by_index, key=int)]


def scores(logs: dict, name: str) -> list[float]:
    return [float(v["score"]) for v in items(logs, name)]


def agg(logs: dict, name: str) -> float | None:
    entry = logs.get(name)
    return None if not isinstance(entry, dict) or entry.get("agg_value") is None else float(entry["agg_value"])


def mia_metric(forget_scores: Sequence[float], holdout_scores: Sequence[float], auc: float) -> dict:
    """One attack in open-unlearning's layout: per-split scores and the forget-vs-holdout AUC."""
    def split(values):
        return metric([{"score": float(s)} for s in values], mean_of("score"))
    return {"forget": split(forget_scores), "holdout": split(holdout_scores), "auc": float(auc), "agg_value": float(auc)}
