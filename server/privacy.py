"""A job's privacy report over all its rounds, opened and planned (DESIGN.md §5).

Rounds already opened use the σ_ℓ and τ_ℓ they were published with; rounds still to come use the
same calibration the server will run when it opens them (it depends only on the job key, C_ℓ·γ^(r−1)
and the settings), so a job is accounted for all R rounds from its creation. Relative noise depends
on θ_r, so its future rounds are unknown (and carry no ε anyway). A job that ended is accounted
for the rounds it published.
"""

from __future__ import annotations

from pum.common.noise import draw_alphas
from pum.common.privacy.report import EVERY_COPY, Coalition, RoundRelease, privacy_report
from pum.common.settings import PumSettings
from pum.common.states import END_STATES

from .rounds import clip_thresholds_for_round, dp_noise, manual_per_layer_sigmas, round_noise
from .store import Job, Store


def planned_noise(settings: PumSettings, sizes: dict[str, int], key: bytes, clip_norms, round_: int):
    """(σ_ℓ, τ_ℓ) a round will get when it opens, or None when that depends on θ_r (relative noise)."""
    mode = settings.noise_mode
    if mode == "dp":
        noise = dp_noise(sizes, key, settings, clip_norms, round_)
        return noise.sigmas, noise.taus
    if mode == "manual":
        sigmas = dict.fromkeys(sizes, settings.sigma)
    elif mode == "manual_per_layer":
        sigmas = manual_per_layer_sigmas(settings.sigma_per_layer, list(sizes))
    else:
        return None
    return sigmas, dict.fromkeys(sigmas, settings.jitter_tau)


def coalition_of(settings: PumSettings, store: Store, job_id: str) -> Coalition:
    """The most copies of one round one party may hold: every copy when all tokens are one data owner."""
    parties, observed, m = store.token_parties(job_id), store.largest_party_leases(job_id), settings.copies_m
    if len(parties) <= 1:
        return Coalition(m, EVERY_COPY, observed)
    cap, most = settings.per_token_copy_cap, max(parties.values())
    if cap is None:
        return Coalition(m, f"{len(parties)} parties and no per_token_copy_cap: one party's tokens may lease every "
                            "copy of a round", observed)
    return Coalition(min(m, cap * most), f"{len(parties)} parties: per_token_copy_cap = {cap} × {most} tokens of the "
                                         "largest party, for the tokens issued so far", observed)


def privacy_of(job: Job, store: Store, key: bytes) -> dict:
    settings = job.spec.settings
    opened = {r.round: r for r in store.rounds(job.id)}
    clip_norms, sizes = job.spec.clip_norms, job.spec.group_sizes
    last = max(opened, default=0) if job.state in END_STATES else settings.rounds_R
    rounds = []
    for r in range(1, last + 1):
        if r in opened:
            scales = round_noise(opened[r], settings)
        else:
            scales = planned_noise(settings, sizes, key, clip_norms, r)
            if scales is None:
                break
        clips = clip_thresholds_for_round(clip_norms, settings, r) if clip_norms else None
        alphas = draw_alphas(key, r, settings.copies_m, settings.alpha_min, settings.alpha_max)
        rounds.append(RoundRelease(alphas, scales[0], scales[1], clips, opened=r in opened))
    report = privacy_report(settings, rounds, coalition_of(settings, store, job.id), sizes,
                            has_public_base=job.spec.has_base)
    return {"job": job.id, "state": job.state, **report.to_dict()}
