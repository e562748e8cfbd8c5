"""The TOFU numbers the quality benchmark records, from a model in memory, and nothing more.

`pum.evaluation.tofu.evaluate` computes every TOFU metric of a saved model (privleak, MIA,
extraction strength, forget ROUGE). The quality benchmark records forget quality, model utility,
retain-only utility and forget probability for ~300 runs on a small CPU, so this module scores
only what those need, with the same formulas (`pum.evaluation.metrics`) and the same scoring and
generation code (`pum.evaluation.scoring`):

- forget split: teacher-forced scores of the answer, the paraphrased and the perturbed answers
  (truth ratios → forget quality against the retain model; answer probability); no generation
  (forget ROUGE is not recorded) — saves 40 % of the generation;
- retain, real authors, world facts: scores and greedy generation (the 9 utility components);
- no holdout split (it only feeds membership inference).

The model stays in memory (no save and reload per run).
"""

from __future__ import annotations

from dataclasses import dataclass

from pum.common.qa import QAPair
from pum.evaluation import metrics
from pum.evaluation.data import PERTURBED_ROLES, TofuData
from pum.evaluation.scoring import generate_answers, rouge_l_recall, score_answers
from pum.evaluation.summary import UTILITY_COMPONENTS

RETAIN_COMPONENTS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio")


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 32  # sequences per forward pass or generate call; no effect on the values
    max_new_tokens: int = 32  # greedy generation budget for ROUGE (DESIGN.md: 200; see the report)


def score_role(model, tokenizer, role: str, records: list[dict], settings: EvalSettings, generate: bool) -> list[dict]:
    """Per question: P̄ of the answer, truth ratio, normalised P̄ (real authors / world facts), ROUGE-L recall."""
    reference_key = PERTURBED_ROLES[role][1]
    pairs, spans = [], []
    for r in records:
        answers = [r["answer"]] + ([] if reference_key == "answer" else [r[reference_key]]) + list(r["perturbed_answer"])
        spans.append((len(pairs), len(answers)))
        pairs.extend(QAPair(r["question"], a) for a in answers)
    scores = score_answers(model, tokenizer, pairs, settings.batch_size)
    generations = (generate_answers(model, tokenizer, [r["question"] for r in records], settings.batch_size,
                                    settings.max_new_tokens) if generate else [None] * len(records))
    items = []
    for r, (start, count), generation in zip(records, spans, generations):
        answer = scores[start]
        reference = answer if reference_key == "answer" else scores[start + 1]
        perturbed = scores[start + 1 + (reference_key != "answer"): start + count]
        item = {"prob": answer.prob,
                "truth_ratio": metrics.truth_ratio(reference.avg_nll, [p.avg_nll for p in perturbed])}
        if reference_key == "answer":
            item["normalised_prob"] = metrics.normalised_prob(answer.prob, [p.prob for p in perturbed])
        if generate:
            item["rouge_l_recall"] = rouge_l_recall(r["answer"], generation)
        items.append(item)
    return items


def score_model(model, tokenizer, data: TofuData, settings: EvalSettings = EvalSettings()) -> dict[str, list[dict]]:
    """{role: per-question items} for forget, retain, real_authors and world_facts (those present)."""
    model.eval()
    return {role: score_role(model, tokenizer, role, data.records[role], settings, generate=role != "forget")
            for role in PERTURBED_ROLES if role in data.records}


def harmonic(values: list[float]) -> float:
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def summarise(items: dict[str, list[dict]], retain_ratios: list[float] | None) -> dict:
    """forget_quality (KS p-value against the retain model's forget truth ratios; None without them), its floor,
    model_utility and its 9 components, retain_utility (harmonic mean of the 3 retain ones), forget_prob,
    forget_truth_ratio, and the forget truth ratios themselves (the retain model's row is every other's reference)."""
    forget = items["forget"]
    ratios = [item["truth_ratio"] for item in forget]
    out: dict = {"forget_truth_ratios": ratios, "n_forget": len(forget)}
    if retain_ratios is not None:
        p = metrics.ks_pvalue(ratios, retain_ratios)
        out.update(forget_quality=p, forget_quality_is_floor=metrics.is_ks_floor(p, len(ratios), len(retain_ratios)),
                   forget_quality_floor=metrics.ks_floor(len(ratios), len(retain_ratios)))
    else:
        out.update(forget_quality=None, forget_quality_is_floor=None, forget_quality_floor=None)
    out["forget_prob"] = sum(item["prob"] for item in forget) / len(forget)
    out["forget_truth_ratio"] = metrics.forget_truth_ratio(ratios)
    components = {}
    for name, (role, key) in UTILITY_COMPONENTS.items():
        role_items = items.get(role)
        if not role_items:
            components[name] = None
        elif key == "truth_ratio":
            components[name] = metrics.utility_truth_ratio([item[key] for item in role_items])
        else:
            components[name] = sum(item[key] for item in role_items) / len(role_items)
    utility, missing = metrics.model_utility(components)
    out.update(model_utility=utility, model_utility_missing=missing, components=components)
    retain = [components[name] for name in RETAIN_COMPONENTS]
    out["retain_utility"] = None if any(v is None for v in retain) else harmonic(retain)
    return out
