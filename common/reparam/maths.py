"""The maths of the reparameterizations as pure functions (DESIGN.md §4, "Reparameterizations").

Weights use the Hugging Face `[out, in]` layout. A projection whose output rows are grouped by
attention head is viewed as `[n_heads, d_h, *rest]` (`rest` is `[in]` for a weight, empty for a
bias), so the same code moves weights and biases.

- `haar_orthogonal`: Q = QR(G)·diag(sign(diag R)), G Gaussian; the sign fix makes Q Haar-uniform
  on O(n) (Mezzadri 2007, "How to generate random matrices from the classical compact groups").
- `rope_commuting_rotation`: with the `rotate_half` convention RoPE rotates the planes
  (t, t + r/2), t < r/2, of the first r = rotary_dim coordinates by angles m·ω_t. A block matrix
  of independent 2×2 rotations on the same planes commutes with it (2-D rotations commute), so
  for queries and keys both multiplied by the same R: (D_m R q)ᵀ(D_n R k) = qᵀ Rᵀ D_{n−m} R k =
  qᵀ D_{n−m} k. The coordinates past r see no RoPE: any orthogonal block works there.
- Head maps: rows of head i ← M_{g(i)}·rows (`left_multiply_heads`), columns of head i ←
  columns·M_{g(i)} (`right_multiply_heads`), with g(i) = i // (n_heads / n_kv_heads), the
  `repeat_kv` grouping (`kv_group`).
- Permutations: rows or columns gathered by π; `invert_permutation` gives π⁻¹.
"""

from __future__ import annotations

import math

import torch


def haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random n × n orthogonal matrix (float64 QR, returned as float32)."""
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(torch.float32)


def plane_rotation(angles: torch.Tensor) -> torch.Tensor:
    """The 2h × 2h matrix rotating each plane (t, t + h) by angles[t], h = len(angles).

    Row t is (…cos θ_t at t, −sin θ_t at t + h…); row t + h is (…sin θ_t at t, cos θ_t at t + h…):
    the same orientation as `rotate_half` (x_t cos − x_{t+h} sin, x_{t+h} cos + x_t sin).
    """
    half = angles.numel()
    cos, sin = torch.cos(angles), torch.sin(angles)
    rotation = torch.zeros(2 * half, 2 * half, dtype=angles.dtype)
    index = torch.arange(half)
    rotation[index, index] = cos
    rotation[index, index + half] = -sin
    rotation[index + half, index] = sin
    rotation[index + half, index + half] = cos
    return rotation


def rope_commuting_rotation(head_dim: int, rotary_dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random head_dim × head_dim orthogonal matrix that commutes with `rotate_half` RoPE applied
    to the first `rotary_dim` coordinates: independent random plane rotations there, a Haar
    orthogonal block on the `head_dim − rotary_dim` coordinates RoPE leaves alone."""
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be even and within [0, head_dim={head_dim}] (got {rotary_dim})")
    angles = torch.rand(rotary_dim // 2, generator=generator, dtype=torch.float64) * (2 * math.pi)
    rotation = torch.eye(head_dim, dtype=torch.float32)
    rotation[:rotary_dim, :rotary_dim] = plane_rotation(angles).to(torch.float32)
    if rotary_dim < head_dim:
        rotation[rotary_dim:, rotary_dim:] = haar_orthogonal(head_dim - rotary_dim, generator)
    return rotation


def random_permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of range(n) (int64)."""
    return torch.randperm(n, generator=generator)


def invert_permutation(permutation: torch.Tensor) -> torch.Tensor:
    """π⁻¹, so that x[π][π⁻¹] = x."""
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel())
    return inverse


def kv_group(n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """g(i) = i // (n_heads / n_kv_heads) for every query head i: the KV head it reads."""
    return torch.arange(n_heads) // (n_heads // n_kv_heads)


def left_multiply_heads(tensor: torch.Tensor, matrices: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Rows of head i ← matrices[group[i]] · rows of head i.

    `tensor` is `[n·d_h, *rest]` (a weight or a bias), `matrices` `[n_groups, d_h, d_h]`,
    `group` `[n]`. Returns a new tensor of the same shape.
    """
    n, head_dim = group.numel(), matrices.shape[-1]
    heads = tensor.reshape(n, head_dim, -1)
    return torch.matmul(matrices[group], heads).reshape(tensor.shape)


def right_multiply_heads(tensor: torch.Tensor, matrices: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Columns of head i ← columns of head i · matrices[group[i]]; `tensor` is `[out, n·d_h]`."""
    n, head_dim = group.numel(), matrices.shape[-1]
    heads = tensor.reshape(tensor.shape[0], n, head_dim).transpose(0, 1)  # [n, out, d_h]
    return torch.matmul(heads, matrices[group]).transpose(0, 1).reshape(tensor.shape)


def permute_rows(tensor: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """tensor[π] along dim 0 (weight rows or bias entries)."""
    return tensor.index_select(0, permutation)


def permute_columns(tensor: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """tensor[:, π]."""
    return tensor.index_select(1, permutation)
