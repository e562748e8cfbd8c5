"""The TOFU numbers the quality benchmark records, from a model in memory, and nothing more.

`pum.evaluation.tofu.evaluate` scores a saved model on every split and computes every TOFU metric
(privleak and MIA need the holdout split). The quality benchmark records forget quality, model
utility, retain-only utility and forget probability for ~300 runs on a small CPU, so it scores the
model it holds in memory (no save and reload per run) on the forget, retain, real-author and
world-fact splits with the evaluation's own per-split code, and skips the holdout split.
"""

from __future__ import annotations

from dataclasses import dataclass

from pum.common.prompts import QAEncoder
from pum.evaluation import metrics
from pum.evaluation.data import PERTURBED_ROLES, TofuData
from pum.evaluation.logs import agg, scores
from pum.evaluation.summary import UTILITY_COMPONENTS
from pum.evaluation.tofu import EvalOptions, _perturbed_logs

RETAIN_COMPONENTS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio")


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 32  # sequences per forward pass or generate call; no effect on the values
    max_new_tokens: int = 32  # greedy generation budget for ROUGE (DESIGN.md: 200; see the report)


def score_model(model, tokenizer, data: TofuData, settings: EvalSettings = EvalSettings()) -> dict:
    """The evaluation logs (open-unlearning's layout) of forget, retain, real_authors and world_facts (those present)."""
    model.eval()
    options = EvalOptions(batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens)
    encoder = tokenizer if isinstance(tokenizer, QAEncoder) else QAEncoder(tokenizer, options.prompt_format)
    logs: dict = {}
    for role in PERTURBED_ROLES:
        if role in data.records:
            logs.update(_perturbed_logs(model, encoder, role, data.records[role], options, progress=False)[0])
    return logs


def harmonic(values: list[float]) -> float:
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def summarise(logs: dict, retain_ratios: list[float] | None) -> dict:
    """forget_quality (KS p-value against the retain model's forget truth ratios; None without them), its floor,
    model_utility and its 9 components, retain_utility (harmonic mean of the 3 retain ones), forget_prob,
    forget_truth_ratio, and the forget truth ratios themselves (the retain model's row is every other's reference)."""
    ratios = scores(logs, "forget_truth_ratio")
    out: dict = {"forget_truth_ratios": ratios, "n_forget": len(ratios)}
    if retain_ratios is not None:
        p = metrics.ks_pvalue(ratios, retain_ratios)
        out.update(forget_quality=p, forget_quality_is_floor=metrics.is_ks_floor(p, len(ratios), len(retain_ratios)),
                   forget_quality_floor=metrics.ks_floor(len(ratios), len(retain_ratios)))
    else:
        out.update(forget_quality=None, forget_quality_is_floor=None, forget_quality_floor=None)
    out["forget_prob"] = agg(logs, "forget_Q_A_Prob")
    out["forget_truth_ratio"] = agg(logs, "forget_truth_ratio")
    components = {name: agg(logs, name) for name in UTILITY_COMPONENTS}
    utility, missing = metrics.model_utility(components)
    out.update(model_utility=utility, model_utility_missing=missing, components=components)
    retain = [components[name] for name in RETAIN_COMPONENTS]
    out["retain_utility"] = None if any(v is None for v in retain) else harmonic(retain)
    return out
