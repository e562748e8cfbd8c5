"""Harmonic streaming aggregation (DESIGN.md §3.6–3.7, §4).

With w_k = 1/α_k the server keeps S0 = Σ w_k and S1 = Σ w_k·Δ_k and, once all m copies are in,
applies θ ← θ + η·S1/S0. Writing Δ_k ≈ g + J·α_k·ε⁰_k, the linear noise term becomes
J·Σ_k ε⁰_k / S0 = 0 for zero-sum noise.

Output files are server secrets (S1 reveals α through its weights, θ is the model): they are
created 0600. S1 lives on disk, not in memory: each accepted delta produces a new S1 file from the previous
one, tensor by tensor, so the server holds O(one tensor) whatever m and the model size are,
and the previous file stays valid until the new one is committed (atomic acceptance).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from .codec import SafetensorsFile, SafetensorsFileWriter, TensorInfo
from .layers import layer_group

TensorMap = Callable[[str, torch.Tensor], torch.Tensor]


def harmonic_weight(alpha: float) -> float:
    """w_k = 1/α_k."""
    return 1.0 / alpha


def clip_scale(norm: float, threshold: float | None) -> float:
    """The factor of clip(v, C) = v·min(1, C/‖v‖₂); 1 when there is no threshold."""
    if threshold is None or norm <= threshold:
        return 1.0
    return threshold / norm


def update_clip_scales(
    group_sum_squares: dict[str, float], per_layer: float | None, total: float | None
) -> dict[str, float]:
    """Per-group factors: each group clipped to `per_layer`, then the whole delta to `total`."""
    scales = {g: clip_scale(math.sqrt(s), per_layer) for g, s in group_sum_squares.items()}
    clipped_norm = math.sqrt(sum(s * scales[g] ** 2 for g, s in group_sum_squares.items()))
    overall = clip_scale(clipped_norm, total)
    return {g: f * overall for g, f in scales.items()}


def sum_of_squares(tensor: torch.Tensor, chunk: int = 1 << 20) -> float:
    """Σ x² in float64, one chunk at a time (a whole-tensor float64 copy would double the peak memory)."""
    flat = tensor.reshape(-1)
    return sum(part.double().pow(2).sum().item() for part in flat.split(chunk)) if flat.numel() else 0.0


def group_sum_squares(source: SafetensorsFile) -> dict[str, float]:
    """Σ x² per layer group of a file's tensors (float64 sums)."""
    sums: dict[str, float] = {}
    for info in source.infos:
        value = sum_of_squares(source.read(info.name))
        group = layer_group(info.name)
        sums[group] = sums.get(group, 0.0) + value
    return sums


def accumulate_delta(
    delta: SafetensorsFile,
    s1_previous: SafetensorsFile | None,
    out: Path | BinaryIO,
    weight: float,
    *,
    align: TensorMap | None = None,
    clip_per_layer: float | None = None,
    clip_total: float | None = None,
) -> dict[str, float]:
    """Write S1 + weight·clip(align(Δ)) to `out` (a path or an open blob), one tensor at a time; returns norms.

    `align` inverts the copy's reparameterization (Δ_k = T_k⁻¹(Δ'_k)). The clipping norms are
    taken on the raw delta: the transforms are orthogonal maps and permutations within a
    layer, so they preserve every group's L2 norm.
    """
    sums = group_sum_squares(delta) if (clip_per_layer or clip_total) else {}
    scales = update_clip_scales(sums, clip_per_layer, clip_total) if sums else {}
    infos = [TensorInfo(i.name, "F32", i.shape) for i in delta.infos]
    with SafetensorsFileWriter(out, infos, private=True) as writer:
        for info in delta.infos:
            update = delta.read(info.name).to(torch.float32)
            if align is not None:
                update = align(info.name, update)
            factor = weight * scales.get(layer_group(info.name), 1.0)
            total = s1_previous.read(info.name) if s1_previous is not None else torch.zeros(info.shape)
            writer.write(info.name, total.to(torch.float32).add_(update, alpha=factor))
    norm = math.sqrt(sum(sums.values())) if sums else float("nan")
    return {"delta_norm": norm, "clip_factor_min": min(scales.values(), default=1.0)}


def apply_update(theta: SafetensorsFile, s1: SafetensorsFile, s0: float, eta: float, out: Path | BinaryIO) -> None:
    """Write θ + η·S1/S0 to `out` (a path or an open blob) tensor by tensor (float32)."""
    if s0 <= 0:
        raise ValueError(f"S0 must be positive (got {s0}): no copy was merged")
    infos = [TensorInfo(i.name, "F32", i.shape) for i in theta.infos]
    with SafetensorsFileWriter(out, infos, private=True) as writer:
        for info in theta.infos:
            merged = theta.read(info.name).to(torch.float32)
            writer.write(info.name, merged.add_(s1.read(info.name), alpha=eta / s0))
