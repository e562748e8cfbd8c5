"""`pum audit`: the operator's own check of what one coalition could learn from a round.

It regenerates the round's m published copies exactly as workers receive them (bytes parsed back,
reparameterization included), samples the same coordinates of each, and runs the
minimum-variance attack of `pum.common.privacy.audit` per layer group against the true center.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pum.common.codec import SafetensorsFile, read_stream
from pum.common.errors import Conflict, NotFound
from pum.common.layers import layer_group
from pum.common.privacy.audit import audit
from pum.common.settings import PumSettings

from . import rounds as R
from .store import Store


def sample_indices(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(numel, generator=generator)[:count] if numel > count else torch.arange(numel)


def audit_round(state_dir: Path, job_id: str, coords_per_tensor: int = 2000, seed: int = 0) -> dict:
    """Per group: the attack's recovery error relative to the per-copy noise, for the current round."""
    store = Store(state_dir / "state.db")
    try:
        job = store.job(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} in {state_dir}")
        rnd = store.round(job_id, job.round)
        if rnd is None or rnd.state != "open":
            raise Conflict(f"job {job_id} has no open round to audit (state {job.state})")
        files = R.JobFiles(state_dir / "jobs" / job_id)
        settings = PumSettings.from_spec(job.spec["pum"])
        key = files.key.read_bytes()
        layout = R.published_layout(files.theta(job.round), job.spec["dtypes"])
        generator = torch.Generator().manual_seed(seed)
        picks = {i.name: sample_indices(i.numel, coords_per_tensor, generator) for i in layout}

        def sampled(tensors) -> dict[str, list[np.ndarray]]:
            groups: dict[str, list[np.ndarray]] = {}
            for name, tensor in tensors:
                values = tensor.reshape(-1).double()[picks[name]].numpy()
                groups.setdefault(layer_group(name), []).append(values)
            return {g: np.concatenate(v) for g, v in groups.items()}

        copies = []
        for k in range(settings.copies_m):
            chunks = R.copy_chunks(files, key, settings, job.round, k, rnd.sigmas, layout)
            copies.append(sampled((info.name, t) for info, t in read_stream(chunks)))
        with SafetensorsFile(files.center(job.round)) as center:
            truth = sampled((i.name, center.read(i.name)) for i in layout)
        reference = None
        if files.base.exists():
            with SafetensorsFile(files.base) as base:
                reference = sampled((i.name, base.read(i.name)) for i in layout)
        groups = {
            g: audit([c[g] for c in copies], truth[g], reference[g] if reference else None)
            for g in truth
        }
        worst = max(groups.values(), key=lambda r: -r["relative_error"])
        return {
            "job": job_id, "round": job.round, "copies": settings.copies_m,
            "noise_structure": settings.noise_structure, "jitter_tau": settings.jitter_tau,
            "reparameterized": settings.use_orthogonal_reparam,
            "smallest_relative_error": worst["relative_error"],
            "groups": {g: {k: v for k, v in r.items() if k != "weights"} for g, r in groups.items()},
        }
    finally:
        store.close()
