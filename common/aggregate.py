"""Harmonic streaming aggregation (DESIGN.md §3.6–3.7, §4).

With w_k = 1/α_k the server keeps S0 = Σ w_k and S1 = Σ w_k·Δ_k and, once all m copies are in,
applies θ ← θ + η·S1/S0. Writing Δ_k ≈ g + J·α_k·ε⁰_k, the linear noise term becomes
J·Σ_k ε⁰_k / S0 = 0 for zero-sum noise.

The server keeps every accepted upload until the round is complete and reduces them once, tensor by
tensor in the copies' order k (`apply_merged`): it holds O(one tensor) whatever m and the model
size are, each upload is written once and read once, and the merged model does not depend on the
order the uploads arrived in. Output files are server secrets (θ is the model): created 0600.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from .codec import SafetensorsFile, SafetensorsFileWriter, TensorInfo
from .layers import layer_group

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


def group_totals(names: list[str], value: Callable[[str], float]) -> dict[str, float]:
    """Σ value(name) per layer group, added in the order of `names` (float64: the order fixes the bits)."""
    totals: dict[str, float] = {}
    for name in names:
        group = layer_group(name)
        totals[group] = totals.get(group, 0.0) + value(name)
    return totals


def group_sum_squares(names: list[str], read: Callable[[str], torch.Tensor]) -> dict[str, float]:
    """Σ x² per layer group of the tensors `read(name)` (float64 sums)."""
    return group_totals(names, lambda name: sum_of_squares(read(name)))


def extremes(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a tensor in one pass and without a tensor-sized temporary: NaN anywhere makes
    both NaN, and ±inf shows at an end, so both are finite exactly when every value is; (0, 0) when empty.
    (`isfinite(t).all()` plus `abs().max()` took 12× longer on a 196 M upload: bench/upload_checks.py.)"""
    if not tensor.numel():
        return 0.0, 0.0
    low, high = torch.aminmax(tensor)
    return low.item(), high.item()


@dataclass(frozen=True)
class WeightedUpdate:
    """One accepted copy's part of the step: Δ_k tensor by tensor (aligned, float32), its weight
    w_k = 1/α_k and its clip factor per layer group ({}: not clipped)."""

    weight: float
    read: Callable[[str], torch.Tensor]
    scales: dict[str, float]

    def factor(self, name: str) -> float:
        return self.weight * self.scales.get(layer_group(name), 1.0)


def apply_merged(theta: SafetensorsFile, updates: list[WeightedUpdate], eta: float, out: Path | BinaryIO) -> None:
    """Write θ + η·S1/S0 to `out` tensor by tensor (float32), with S0 = Σ_k w_k and
    S1 = Σ_k w_k·c_k,ℓ·Δ_k summed in the order of `updates` (the copies' order k: the sums, and so
    the model, do not depend on the order the uploads arrived in).

    Refuses (ValueError) to write a non-finite θ: nothing is written then.
    """
    s0 = sum(update.weight for update in updates)
    if s0 <= 0:
        raise ValueError(f"S0 must be positive (got {s0}): no copy was merged")
    infos = [TensorInfo(i.name, "F32", i.shape) for i in theta.infos]
    with SafetensorsFileWriter(out, infos, private=True) as writer:
        for info in theta.infos:
            s1 = torch.zeros(info.shape, dtype=torch.float32)
            for update in updates:
                s1.add_(update.read(info.name), alpha=update.factor(info.name))
            merged = theta.read(info.name).to(torch.float32).add_(s1, alpha=eta / s0)
            if not all(math.isfinite(v) for v in extremes(merged)):
                raise ValueError(f"the step makes {info.name} non-finite: θ is left as it was")
            writer.write(info.name, merged)
