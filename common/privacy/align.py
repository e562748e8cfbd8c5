"""Undo the reparameterizations as an attacker would: bring every copy into copy 0's basis.

Copy k of a decoder layer is T_k(θ̃ + n_k) with T_k orthogonal per KV head (V/O, and Q/K plane
rotations) and a permutation of the FFN channels (`pum.common.reparam`). A party holding the
copies does not know T_k, but every copy shows the same weights in another basis, so it estimates
M_k ≈ T_0·T_k⁻¹ from the copies themselves:

- V/O, per KV head j: V rows ← Qᵀ·rows, O columns of its query heads ← columns·Q. Stack
  F = [V_j, O_iᵀ …] (d_h × N) and solve the orthogonal Procrustes problem min_M ‖F_0 − M·F_k‖
  (M = U·Vᵀ from the SVD of F_0·F_kᵀ); apply M to copy k's rows and Mᵀ to its columns.
- Q/K, per KV head j: K rows and the rows of its query heads ← R·rows; the same Procrustes on
  F = [K_j, Q_i …] (a general orthogonal M, which contains the plane rotations).
- FFN: gate/up rows and down columns ← [π]. Each channel's features (its gate and up rows, its
  down column) are matched to copy 0's by a linear assignment on squared distances (Hungarian).

Aligned copies are T_0(θ̃ + n_k): the attacks of `audit` then recover T_0(θ̃), a function-preserving
reparameterization of the center, which is as good as the center itself. The more columns a
head's block has (a wider model), the better M and π are determined: reparameterization hides
little from a party holding every copy of a wide model. Arrays are numpy float64; the inputs are
not modified. Cost: one d_h×N SVD per head and one I×I assignment (O(I³)) per layer and copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from pum.common.reparam.base import FFN, FFN_IN, FFN_OUT, GATE_UP, QK, QKV, VO, K, O, Q, V, Adapter, Dims

__all__ = ["align_layer", "procrustes"]

Piece = tuple[str, slice, str]  # (tensor name, rows of it, kind: q | k | v (rows), o (columns), ffn_in, ffn_out)


def procrustes(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The orthogonal M minimising ‖target − M·source‖_F (Schönemann 1966): U·Vᵀ of target·sourceᵀ."""
    u, _, vt = np.linalg.svd(target @ source.T)
    return u @ vt


def _pieces(adapter: Adapter, dims: Dims, layer: int) -> list[Piece]:
    """Every part of the layer the transform moves, fused tensors split by rows."""
    q, kv, inter = dims.q_rows, dims.kv_rows, dims.intermediate
    split = {
        Q: [(slice(None), "q")], K: [(slice(None), "k")], V: [(slice(None), "v")], O: [(slice(None), "o")],
        FFN_IN: [(slice(None), "ffn_in")], FFN_OUT: [(slice(None), "ffn_out")],
        QKV: [(slice(0, q), "q"), (slice(q, q + kv), "k"), (slice(q + kv, q + 2 * kv), "v")],
        GATE_UP: [(slice(0, inter), "ffn_in"), (slice(inter, 2 * inter), "ffn_in")],
    }
    prefix = f"{adapter.layer_prefix}{layer}."
    return [(prefix + suffix, rows, kind) for suffix, entry in adapter.layer_map(dims).items()
            for rows, kind in split.get(entry.role, [])]


def _rows(t: np.ndarray, rows: slice) -> np.ndarray:
    """The rows of a weight ([rows, in]) or bias ([rows] → [rows, 1]) as a 2-D view."""
    part = t[rows]
    return part.reshape(part.shape[0], -1)


def _head_features(copy: dict[str, np.ndarray], pieces: list[Piece], row_kinds: tuple[str, str], head: int,
                   dims: Dims) -> np.ndarray:
    """[row blocks of KV head `head`, column blocks (transposed) of its query heads] as d_h × N."""
    d, per_kv = dims.head_dim, dims.n_heads // dims.n_kv_heads
    kv_kind, q_kind = row_kinds
    blocks = []
    for name, rows, kind in pieces:
        t = _rows(copy[name], rows) if kind != "o" else copy[name]
        if kind == kv_kind:
            blocks.append(t[head * d:(head + 1) * d])
        elif kind == q_kind == "o":
            blocks += [t[:, i * d:(i + 1) * d].T for i in range(head * per_kv, (head + 1) * per_kv)]
        elif kind == q_kind:
            blocks += [t[i * d:(i + 1) * d] for i in range(head * per_kv, (head + 1) * per_kv)]
    return np.concatenate(blocks, axis=1)


def _apply_head_map(copy: dict[str, np.ndarray], pieces: list[Piece], row_kinds: tuple[str, str], head: int,
                    dims: Dims, m: np.ndarray) -> None:
    d, per_kv = dims.head_dim, dims.n_heads // dims.n_kv_heads
    kv_kind, q_kind = row_kinds
    for name, rows, kind in pieces:
        if kind == "o" and q_kind == "o":
            t = copy[name]
            for i in range(head * per_kv, (head + 1) * per_kv):
                t[:, i * d:(i + 1) * d] = t[:, i * d:(i + 1) * d] @ m.T
        elif kind in row_kinds:
            t = _rows(copy[name], rows)
            heads = [head] if kind == kv_kind else range(head * per_kv, (head + 1) * per_kv)
            for i in heads:
                t[i * d:(i + 1) * d] = m @ t[i * d:(i + 1) * d]


def _channel_features(copy: dict[str, np.ndarray], pieces: list[Piece]) -> np.ndarray:
    """One row per FFN channel: its gate/up rows and its down column."""
    blocks = [_rows(copy[n], r) if kind == "ffn_in" else copy[n].T for n, r, kind in pieces
              if kind in ("ffn_in", "ffn_out")]
    return np.concatenate(blocks, axis=1)


def _permute_channels(copy: dict[str, np.ndarray], pieces: list[Piece], order: np.ndarray) -> None:
    for name, rows, kind in pieces:
        if kind == "ffn_in":
            t = _rows(copy[name], rows)
            t[:] = t[order]
        elif kind == "ffn_out":
            copy[name][:] = copy[name][:, order]


def align_layer(copies: Sequence[dict[str, np.ndarray]], adapter: Adapter, dims: Dims, layer: int,
                parts: frozenset[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Copies 1..m−1 of one layer brought into copy 0's basis (copy 0 returned as is); each copy is
    a mapping of tensor name to array (other tensors pass through)."""
    parts = adapter.parts if parts is None else parts
    pieces = [p for p in _pieces(adapter, dims, layer) if p[0] in copies[0]]
    reference = copies[0]
    out = [dict(reference)]
    for copy in copies[1:]:
        copy = {name: np.array(t, dtype=np.float64) for name, t in copy.items()}
        for part, kinds in ((VO, ("v", "o")), (QK, ("k", "q"))):
            if part not in parts:
                continue
            for head in range(dims.n_kv_heads):
                m = procrustes(_head_features(reference, pieces, kinds, head, dims),
                               _head_features(copy, pieces, kinds, head, dims))
                _apply_head_map(copy, pieces, kinds, head, dims, m)
        if FFN in parts:
            ref_f, own_f = _channel_features(reference, pieces), _channel_features(copy, pieces)
            cost = (ref_f**2).sum(1)[:, None] + (own_f**2).sum(1)[None, :] - 2 * ref_f @ own_f.T
            _, order = linear_sum_assignment(cost)
            _permute_channels(copy, pieces, order)
        out.append(copy)
    return out
