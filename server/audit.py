"""`pum audit`: the operator's own check of what the party holding every copy of a round learns.

It regenerates the round's m published copies exactly as workers receive them (model dtype,
reparameterization included), one layer group at a time, and per group runs every attack of
`pum.common.privacy.audit` (min-variance, center-free) on a sample of coordinates:

- as published: the copies compared with the center as they are;
- aligned (reparameterization on): the copies first brought into copy 0's basis by
  `pum.common.privacy.align` (Procrustes per KV head, assignment of FFN channels), compared with
  T_0(center), which is as useful to the attacker as the center.

Each group reports its strongest result next to the floor (1ᵀΣ_ℓ⁻¹1)^(−1/2) the true release
allows; an error well below the floor would mean the accounting is wrong. Memory: the m copies of
one layer group in float64.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pum.common.errors import Conflict, NotFound
from pum.common.layers import GLOBAL_GROUP, layer_group
from pum.common.noise import draw_alphas
from pum.common.privacy.align import align_layer
from pum.common.privacy.audit import audit
from pum.common.privacy.release import copy_covariance, ones_precision
from pum.common.reparam import adapter_for
from pum.common.states import RoundState

from .blobs import LocalBlobStore
from .job_files import JobFiles
from .rounds import copy_tensors, copy_transform, published_layout, round_noise
from .store import SqliteStore

REPARAM_NOTE = ("reparameterization hides little from a party holding every copy of a round: it aligns the copies "
                "(Procrustes per KV head, assignment of FFN channels) and then attacks as without it; the wider "
                "the model, the better the alignment")


def sample_indices(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(numel, generator=generator)[:count] if numel > count else torch.arange(numel)


def _floor(alphas, sigma: float, tau: float, structure: str) -> float | None:
    precision = ones_precision(copy_covariance(alphas, sigma, tau, structure))
    return precision ** -0.5 if 0 < precision < math.inf else None


def _summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "weights"} | {
        "attacks": {n: {k: v for k, v in a.items() if k != "weights"} for n, a in result["attacks"].items()}}


def audit_round(state_dir: Path, job_id: str, coords_per_tensor: int = 2000, seed: int = 0) -> dict:
    """Per layer group: each attack's recovery error, the strongest, and the floor, for the current round."""
    store = SqliteStore(state_dir / "state.db")
    try:
        job = store.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} in {state_dir}")
        rnd = store.round(job_id, job.round)
        if rnd is None or rnd.state is not RoundState.OPEN:
            raise Conflict(f"job {job_id} has no open round to audit (state {job.state})")
        settings = job.spec.settings
        sigmas, taus = round_noise(rnd, settings)
    finally:
        store.close()
    files = JobFiles(LocalBlobStore(state_dir), job_id)
    key = files.read_key()
    layout = published_layout(files, job.round, job.spec.dtypes)
    alphas = draw_alphas(key, job.round, settings.copies_m, settings.alpha_min, settings.alpha_max)
    generator = torch.Generator().manual_seed(seed)
    picks = {i.name: sample_indices(i.numel, coords_per_tensor, generator).numpy() for i in layout}
    reparam = settings.use_orthogonal_reparam
    transform0 = copy_transform(files, key, settings, job.round, 0) if reparam else None
    if reparam:
        config = files.public_config()
        adapter = adapter_for(config)
        dims = adapter.dims(config)

    groups: dict[str, list] = {}
    for info in layout:
        groups.setdefault(layer_group(info.name), []).append(info)
    reports = {}
    for group, infos in groups.items():
        copies = []
        for k in range(settings.copies_m):
            with copy_tensors(files, key, job.spec, job.round, k, sigmas, taus) as noisy:
                copies.append({i.name: noisy(i).double().numpy() for i in infos})
        with files.read(files.center(job.round, job.spec.clipping)) as center_file:
            center = {i.name: center_file.read(i.name).double() for i in infos}
        base = None
        if job.spec.has_base:
            with files.read(files.BASE) as base_file:
                base = {i.name: base_file.read(i.name).double() for i in infos}

        def sampled(tensors: dict) -> np.ndarray:
            return np.concatenate([np.asarray(tensors[i.name]).reshape(-1)[picks[i.name]] for i in infos])

        floor = _floor(alphas, sigmas[group], taus[group], settings.noise_structure)
        runs = {"as_published": audit([sampled(c) for c in copies], sampled(center),
                                      sampled(base) if base else None, settings.noise_structure, floor)}
        if reparam and group != GLOBAL_GROUP:
            aligned = align_layer(copies, adapter, dims, int(group.split(".")[1]))
            in_basis_0 = lambda ts: {n: transform0.forward(n, t.float()).double().numpy() for n, t in ts.items()}  # noqa: E731
            runs["aligned"] = audit([sampled(c) for c in aligned], sampled(in_basis_0(center)),
                                    sampled(in_basis_0(base)) if base else None, settings.noise_structure, floor)
        strongest = min(runs, key=lambda n: runs[n]["rmse"])
        best = runs[strongest]
        reports[group] = {
            "strongest": f"{strongest}/{best['strongest']}", "relative_error": best["relative_error"],
            "rmse": best["rmse"], "floor_rmse": floor, "rmse_over_floor": best["rmse_over_floor"],
            "runs": {n: _summary(r) for n, r in runs.items()},
        }
    errors = [r["relative_error"] for r in reports.values() if r["relative_error"] is not None]
    return {
        "job": job_id, "round": job.round, "copies": settings.copies_m,
        "noise_structure": settings.noise_structure, "taus": taus, "sigmas": sigmas, "reparameterized": reparam,
        "smallest_relative_error": min(errors) if errors else None,
        "notes": [REPARAM_NOTE] if reparam else [],
        "groups": reports,
    }
