"""The clipped center θ̃ and its public reference θ_ref (DESIGN.md §3.1, §3.7, §4 "Clipping").

    θ̃ = θ_ref + clip_ℓ(θ − θ_ref),   clip(v, C) = v·min(1, C/‖v‖₂), per layer group ℓ
    θ_ref ← β·θ_ref + (1 − β)·H       after each round, H = Σ_k w_k·copy_k / S0 (released, not θ̃)
    C_ℓ   = κ_c·Quantile_q({‖θ_ℓ^(j) − θ_base,ℓ‖₂}_j) over public reference models j (quantile policy)

All work is file to file, one tensor at a time (float32 values, float64 sums); the outputs are
server secrets and are created 0600.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .aggregate import clip_scale, sum_of_squares
from .codec import SafetensorsFile, SafetensorsFileWriter, TensorInfo
from .errors import InvalidInput
from .layers import GLOBAL_GROUP, group_names, layer_group


def group_distances(a: SafetensorsFile, b: SafetensorsFile) -> dict[str, float]:
    """‖a_ℓ − b_ℓ‖₂ per layer group."""
    sums: dict[str, float] = {}
    for info in a.infos:
        group = layer_group(info.name)
        sums[group] = sums.get(group, 0.0) + sum_of_squares(a.read(info.name) - b.read(info.name))
    return {g: math.sqrt(s) for g, s in sums.items()}


def check_same_layout(reference: SafetensorsFile, other: SafetensorsFile, what: str) -> None:
    """Refuse a model whose tensors differ from θ's, listing every difference at once."""
    ours = {i.name: i.shape for i in reference.infos}
    theirs = {i.name: i.shape for i in other.infos}
    problems = [f"{n}: missing" for n in sorted(set(ours) - set(theirs))]
    problems += [f"{n}: not in the model" for n in sorted(set(theirs) - set(ours))]
    problems += [f"{n}: shape {list(theirs[n])} ≠ {list(ours[n])}" for n in sorted(set(ours) & set(theirs)) if ours[n] != theirs[n]]
    if problems:
        raise InvalidInput(f"{what} does not match the model's tensors: " + "; ".join(problems[:20]))


def clip_thresholds(
    groups: list[str], per_layer: float | list[float] | None, global_: float | None
) -> dict[str, float | None]:
    """C_ℓ per group from the settings: one value for every layer, or one per layer; C_global for the rest."""
    layers = [g for g in groups if g != GLOBAL_GROUP]
    if isinstance(per_layer, list):
        if len(per_layer) != len(layers):
            raise InvalidInput(
                f"center_clip_C_per_layer has {len(per_layer)} values; the model has {len(layers)} layers"
            )
        thresholds: dict[str, float | None] = dict(zip(layers, map(float, per_layer)))
    else:
        thresholds = {g: per_layer for g in layers}
    if GLOBAL_GROUP in groups:
        thresholds[GLOBAL_GROUP] = global_
    return thresholds


def quantile_thresholds(
    base: SafetensorsFile, references: list[SafetensorsFile], q: float, kappa: float
) -> dict[str, float]:
    """C_ℓ = κ_c·Quantile_q of the reference models' distances to the base, per group (public data only)."""
    if not references:
        raise InvalidInput("the quantile clipping policy needs center_clip_ref_model_paths (public models)")
    distances = [group_distances(ref, base) for ref in references]
    return {g: kappa * float(np.quantile([d[g] for d in distances], q)) for g in group_names(base.names)}


def write_center(
    theta: SafetensorsFile, reference: SafetensorsFile, thresholds: dict[str, float | None], out: Path | BinaryIO
) -> dict[str, float]:
    """θ̃ = θ_ref + clip_ℓ(θ − θ_ref) to `out` (a path or an open blob); returns each group's clip factor (1 = untouched)."""
    distances = group_distances(theta, reference)
    factors = {g: clip_scale(d, thresholds.get(g)) for g, d in distances.items()}
    with SafetensorsFileWriter(out, [TensorInfo(i.name, "F32", i.shape) for i in theta.infos], private=True) as writer:
        for info in theta.infos:
            ref = reference.read(info.name).float()
            step = theta.read(info.name).float().sub_(ref).mul_(factors[layer_group(info.name)])
            writer.write(info.name, ref.add_(step))
    return factors


def write_reference_ema(reference: SafetensorsFile, released: Callable[[TensorInfo], torch.Tensor], beta: float,
                        out: Path | BinaryIO) -> None:
    """θ_ref ← β·θ_ref + (1 − β)·released to `out` (a path or an open blob), `released(info)` one tensor of a released
    quantity (the harmonic combination of the round's copies), never the secret center: θ_ref must
    stay a function of what was published for the sensitivity 2·C_ℓ of the next round to hold."""
    with SafetensorsFileWriter(out, [TensorInfo(i.name, "F32", i.shape) for i in reference.infos], private=True) as writer:
        for info in reference.infos:
            writer.write(info.name, reference.read(info.name).float().mul_(beta).add_(released(info), alpha=1 - beta))
