"""A job's privacy report: the seed formula's ε beside the true ε of what was released (DESIGN.md §5)."""

from __future__ import annotations

from pum.common.noise import draw_alphas
from pum.common.privacy.report import privacy_report
from pum.common.settings import PumSettings

from .rounds import clip_thresholds_for_round
from .store import Job, Store


def privacy_of(job: Job, store: Store, key: bytes, largest_coalition: int | None) -> dict:
    """Over the rounds opened so far (or, before the start, the first round as planned)."""
    settings = PumSettings.from_spec(job.spec["pum"])
    opened = store.rounds(job.id)
    rounds = [r.round for r in opened] or [1]
    sigmas = [r.sigmas for r in opened] if opened else None
    clip_norms = job.spec.get("clip_norms")
    clips = [clip_thresholds_for_round(clip_norms, settings, r) for r in rounds] if clip_norms else None
    alphas = [draw_alphas(key, r, settings.copies_m, settings.alpha_min, settings.alpha_max) for r in rounds]
    if sigmas is None:
        return {"job": job.id, "state": job.state, "rounds": 0,
                "warnings": ["no round has been opened yet: σ_ℓ is fixed when a round opens; start the job"]}
    report = privacy_report(
        settings, job.spec.get("group_sizes"), clips, sigmas, alphas, largest_coalition,
        has_public_base=job.spec.get("has_base", False),
    )
    return {"job": job.id, "state": job.state, **report}
