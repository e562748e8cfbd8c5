"""Secret randomness and perturbation noise for published copies (DESIGN.md §3–§4).

All secrets derive from one per-job key with HMAC-SHA256, so the server can regenerate any
copy on retry or after a restart without storing α_k or seeds, and nothing is guessable
without the key:

    α_k            = α_min + (α_max − α_min)·U(HMAC(key, "alpha/r/k"))
    z_k[t]         ~ N(0, 1) from seed HMAC(key, "z/r/k/t")          (base noise of copy k, tensor t)
    ξ_k[t]         ~ N(0, 1) from seed HMAC(key, "xi/r/k/t")         (jitter)

Zero-sum base noise: ε⁰_k = √(m/(m−1))·(z_k − z̄), z̄ the mean over the m copies, so
Σ_k ε⁰_k = 0 and Var ε⁰_k = 1 per coordinate. The independent variant uses ε_k = z_k.
Copy k's tensor is  center + α_k·σ_ℓ·ε_k + τ·ξ_k.  Everything is float32.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

NoiseStructure = Literal["zero_sum", "independent"]


def new_job_key() -> bytes:
    """32 bytes from the operating system's CSPRNG."""
    return secrets.token_bytes(32)


def job_key_from_seed(seed: int) -> bytes:
    """A reproducible key for tests and demos; it is only as secret as the seed."""
    return hashlib.sha256(f"pum-test-key/{seed}".encode()).digest()


def _mac(key: bytes, label: str) -> bytes:
    return hmac.new(key, label.encode(), hashlib.sha256).digest()


def derive_seed(key: bytes, purpose: str, round_: int, copy: int, tensor: str) -> int:
    """A 63-bit seed for torch.Generator, unique per (purpose, round, copy, tensor)."""
    return int.from_bytes(_mac(key, f"{purpose}/{round_}/{copy}/{tensor}")[:8], "little") >> 1


def draw_alphas(key: bytes, round_: int, m: int, alpha_min: float, alpha_max: float) -> list[float]:
    """α_1..α_m ~ U[α_min, α_max], derived from the job key (53-bit uniforms)."""
    alphas = []
    for k in range(m):
        u = (int.from_bytes(_mac(key, f"alpha/{round_}/{k}")[:8], "little") >> 11) / float(1 << 53)
        alphas.append(alpha_min + (alpha_max - alpha_min) * u)
    return alphas


def standard_normal(shape: Iterable[int], seed: int, device: str = "cpu") -> torch.Tensor:
    """float32 N(0, 1) of `shape` on `device`, a pure function of (`seed`, the device type): the CPU
    generator gives the same numbers on any machine, a CUDA generator the same on any CUDA device
    (other numbers than the CPU's: a job keeps the device it was created with)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=device)


def base_noise(key: bytes, round_: int, copy: int, tensor: str, shape, device: str = "cpu") -> torch.Tensor:
    """z_k for one tensor."""
    return standard_normal(shape, derive_seed(key, "z", round_, copy, tensor), device)


def jitter_noise(key: bytes, round_: int, copy: int, tensor: str, shape, device: str = "cpu") -> torch.Tensor:
    """ξ_k for one tensor, before scaling by τ."""
    return standard_normal(shape, derive_seed(key, "xi", round_, copy, tensor), device)


def mean_base_noise(key: bytes, round_: int, m: int, tensor: str, shape, device: str = "cpu") -> torch.Tensor:
    """z̄ = (1/m)·Σ_k z_k for one tensor, accumulated one copy at a time (O(tensor) memory), on the CPU."""
    total = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    for k in range(m):
        total.add_(base_noise(key, round_, k, tensor, shape, device))
    return total.div_(m).cpu()


def zero_sum_inplace(z_k: torch.Tensor, z_mean: torch.Tensor, m: int) -> torch.Tensor:
    """ε⁰_k = √(m/(m−1))·(z_k − z̄), written over z_k: Σ_k ε⁰_k = 0 and each keeps unit variance."""
    if m < 2:
        raise ValueError(f"copies_m must be ≥ 2 (got {m}): zero-sum noise needs at least two copies")
    return z_k.sub_(z_mean).mul_(math.sqrt(m / (m - 1)))


@dataclass(frozen=True)
class CopyNoise:
    """The secret parameters of one copy's perturbation. Never leaves the server."""

    key: bytes
    round_: int
    copy: int
    m: int
    alpha: float
    tau: float
    structure: NoiseStructure
    device: str = "cpu"  # where the noise is drawn and added (the job's device); the result comes back to the CPU

    def add_noise_inplace(self, tensor: str, center: torch.Tensor, sigma: float, z_mean: torch.Tensor | None,
                          tau: float | None = None) -> torch.Tensor:
        """center + α_k·σ·ε_k + τ·ξ_k for one tensor, in float32; a float32 `center` is overwritten
        (publication reads each tensor fresh from disk, so no extra copy is made). `z_mean` is z̄;
        `tau` the layer group's τ_ℓ (None: the copy's `tau`)."""
        tau = self.tau if tau is None else tau
        out = center.to(self.device, torch.float32)
        if sigma > 0:
            z = base_noise(self.key, self.round_, self.copy, tensor, out.shape, self.device)
            if self.structure == "zero_sum":
                if z_mean is None:
                    raise ValueError("zero-sum noise needs z̄ of the tensor (mean_base_noise)")
                zero_sum_inplace(z, z_mean.to(self.device), self.m)
            out.add_(z, alpha=self.alpha * sigma)
        if tau > 0:
            out.add_(jitter_noise(self.key, self.round_, self.copy, tensor, out.shape, self.device), alpha=tau)
        return out.cpu()


def harmonic_noise(key: bytes, round_: int, alphas: list[float], tensor: str, shape, sigma: float, tau: float,
                   structure: NoiseStructure, device: str = "cpu") -> torch.Tensor:
    """The noise left in the harmonic combination Σ_k w_k·copy_k / S0 (w_k = 1/α_k, S0 = Σ_k w_k)
    of the m copies of one tensor, in float32:

        zero_sum      τ·Σ_k w_k·ξ_k / S0   (the base noise cancels: Σ_k w_k·α_k·σ·ε⁰_k = σ·Σ_k ε⁰_k = 0)
        independent   σ·Σ_k z_k / S0 + τ·Σ_k w_k·ξ_k / S0

    center + this is a function of the released copies (the server's own α), so anything derived
    from it is post-processing of the release.
    """
    s0 = sum(1.0 / a for a in alphas)
    total = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    for k, alpha in enumerate(alphas):
        if structure == "independent" and sigma > 0:
            total.add_(base_noise(key, round_, k, tensor, shape, device), alpha=sigma / s0)
        if tau > 0:
            total.add_(jitter_noise(key, round_, k, tensor, shape, device), alpha=tau / (alpha * s0))
    return total.cpu()


def relative_sigmas(sum_squares: dict[str, float], counts: dict[str, int], kappa: float, per_layer: bool) -> dict[str, float]:
    """σ_ℓ = κ·RMS_ℓ from per-group sums of squares (of θ, or of θ − θ_base).

    With `per_layer` False every group gets κ·RMS over the whole model.
    """
    if per_layer:
        return {g: kappa * math.sqrt(sum_squares[g] / max(counts[g], 1)) for g in sum_squares}
    total = math.sqrt(sum(sum_squares.values()) / max(sum(counts.values()), 1))
    return {g: kappa * total for g in sum_squares}
