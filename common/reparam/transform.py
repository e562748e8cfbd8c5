"""T_k for one published copy: secrets per layer, derived lazily from the job key (DESIGN.md §3–§4).

Per layer ℓ = i and copy k, a CPU torch.Generator seeded with
`derive_seed(key, "reparam", round_, copy, f"layer.{i}")` draws, always in this order:
Q_j (Haar orthogonal, d_h × d_h) for each KV head j, then R_j (RoPE-commuting rotation) for each
KV head j, then π (a permutation of the intermediate channels). Parts switched off are drawn and
dropped, so the secrets of the other parts do not depend on `parts`.

    V rows of KV head j        ← Q_jᵀ · rows        (weight and bias)
    O columns of query head i  ← columns · Q_{g(i)}
    K rows of KV head j        ← R_j · rows         (weight and bias)
    Q rows of query head i     ← R_{g(i)} · rows    (weight and bias)
    gate, up rows              ← rows[π]            (weights and biases)
    down columns               ← columns[:, π]

Every map is linear and orthogonal on the flattened parameters, so the same `forward` moves
parameters and `inverse` moves uploaded deltas back; SGD commutes with it, Adam only with π.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pum.common.errors import InvalidInput
from pum.common.noise import derive_seed
from pum.common.reparam import maths
from pum.common.reparam.base import (
    ALL_PARTS, FFN, FFN_IN, FFN_OUT, GATE_UP, KEEP, K, O, Q, QK, QKV, ROLE_PARTS, V, VO, Adapter, Dims, Entry,
)


@dataclass(frozen=True)
class LayerSecrets:
    """One layer's maps for one copy; None where a part is off. Matrices are `[n_kv, d_h, d_h]`."""

    values: torch.Tensor | None      # Q_j
    rotations: torch.Tensor | None   # R_j
    permutation: torch.Tensor | None  # π
    group: torch.Tensor              # g(i) for each query head
    kv_heads: torch.Tensor           # arange(n_kv): KV head j uses matrix j

    @classmethod
    def draw(cls, dims: Dims, seed: int, parts: frozenset[str]) -> LayerSecrets:
        generator = torch.Generator().manual_seed(seed)
        values = torch.stack([maths.haar_orthogonal(dims.head_dim, generator) for _ in range(dims.n_kv_heads)])
        rotations = torch.stack([maths.rope_commuting_rotation(dims.head_dim, dims.rotary_dim, generator)
                                 for _ in range(dims.n_kv_heads)])
        permutation = maths.random_permutation(dims.intermediate, generator)
        return cls(values if VO in parts else None, rotations if QK in parts else None,
                   permutation if FFN in parts else None,
                   maths.kv_group(dims.n_heads, dims.n_kv_heads), torch.arange(dims.n_kv_heads))

    def inverted(self) -> LayerSecrets:
        """The secrets of T⁻¹ in the same form: Qᵀ for Q, Rᵀ for R, π⁻¹ for π."""
        transpose = lambda m: None if m is None else m.transpose(-1, -2).contiguous()  # noqa: E731
        permutation = None if self.permutation is None else maths.invert_permutation(self.permutation)
        return LayerSecrets(transpose(self.values), transpose(self.rotations), permutation, self.group, self.kv_heads)


# --- one function per role: (secrets of the direction, dims, float32 tensor) -> tensor ------------

def _queries(s: LayerSecrets, d: Dims, t: torch.Tensor) -> torch.Tensor:
    return t if s.rotations is None else maths.left_multiply_heads(t, s.rotations, s.group)


def _keys(s: LayerSecrets, d: Dims, t: torch.Tensor) -> torch.Tensor:
    return t if s.rotations is None else maths.left_multiply_heads(t, s.rotations, s.kv_heads)


def _values(s: LayerSecrets, d: Dims, t: torch.Tensor) -> torch.Tensor:
    # forward multiplies by Q_jᵀ: `values` holds Q for T and Qᵀ for T⁻¹, so transpose here
    return t if s.values is None else maths.left_multiply_heads(t, s.values.transpose(-1, -2), s.kv_heads)


def _outputs(s: LayerSecrets, d: Dims, t: torch.Tensor) -> torch.Tensor:
    return t if s.values is None else maths.right_multiply_heads(t, s.values, s.group)


def _ffn_in(s: LayerSecrets, d: Dims, t: torch.Tensor) -> torch.Tensor:
    return t if s.permutation is None else maths.permute_rows(t, s.permutation)


def _ffn_out(s: LayerSecrets, d: Dims, t: torch.Tensor) -> torch.Tensor:
    return t if s.permutation is None else maths.permute_columns(t, s.permutation)


def _qkv(s: LayerSecrets, d: Dims, t: torch.Tensor) -> torch.Tensor:
    q, k, v = torch.split(t, [d.q_rows, d.kv_rows, d.kv_rows], dim=0)
    return torch.cat([_queries(s, d, q), _keys(s, d, k), _values(s, d, v)], dim=0)


def _gate_up(s: LayerSecrets, d: Dims, t: torch.Tensor) -> torch.Tensor:
    gate, up = torch.split(t, [d.intermediate, d.intermediate], dim=0)
    return torch.cat([_ffn_in(s, d, gate), _ffn_in(s, d, up)], dim=0)


ROLE_MAPS: dict[str, Callable[[LayerSecrets, Dims, torch.Tensor], torch.Tensor]] = {
    Q: _queries, K: _keys, V: _values, O: _outputs, FFN_IN: _ffn_in, FFN_OUT: _ffn_out,
    QKV: _qkv, GATE_UP: _gate_up, KEEP: lambda s, d, t: t,
}


class CopyTransform:
    """T_k of one copy (key, round, copy): `forward` on published parameters, `inverse` on uploads.

    Secrets are drawn per layer on first use and the last `cache_layers` layers are kept (the
    server streams tensors in file order). Tensors outside the adapter's map pass through
    unchanged (the same object); touched tensors come back as new float32 tensors.
    """

    def __init__(self, adapter: Adapter, config: dict, key: bytes, round_: int, copy: int, *,
                 parts: frozenset[str] | set[str] | None = None, cache_layers: int = 2) -> None:
        parts = adapter.parts if parts is None else frozenset(parts)
        if unknown := parts - ALL_PARTS:
            raise InvalidInput(f"unknown reparameterization parts {sorted(unknown)}; choose from {sorted(ALL_PARTS)}")
        if unsupported := parts - adapter.parts:
            raise InvalidInput(f"{adapter.architecture} does not support parts {sorted(unsupported)} "
                               f"({adapter.notes}); choose from {sorted(adapter.parts)}")
        self.adapter, self.parts = adapter, parts
        self.dims = adapter.dims(config)
        self._layer_map = adapter.layer_map(self.dims)
        self._key, self._round, self._copy = key, round_, copy
        self._cache: OrderedDict[int, tuple[LayerSecrets, LayerSecrets]] = OrderedDict()
        self._cache_layers = max(1, cache_layers)
        self._lock = threading.Lock()

    def entry(self, name: str) -> tuple[int, Entry] | None:
        """(layer, map entry) of a touched tensor, else None."""
        where = self.adapter.locate(name)
        if where is None or where[1] not in self._layer_map:
            return None
        return where[0], self._layer_map[where[1]]

    def touches(self, name: str) -> bool:
        """Whether `forward` changes this tensor (its role is moved by a part that is on)."""
        entry = self.entry(name)
        return entry is not None and bool(ROLE_PARTS[entry[1].role] & self.parts)

    def _secrets(self, layer: int) -> tuple[LayerSecrets, LayerSecrets]:
        with self._lock:
            if layer in self._cache:
                self._cache.move_to_end(layer)
                return self._cache[layer]
        seed = derive_seed(self._key, "reparam", self._round, self._copy, f"layer.{layer}")
        forward = LayerSecrets.draw(self.dims, seed, self.parts)
        pair = (forward, forward.inverted())
        with self._lock:
            self._cache[layer] = pair
            while len(self._cache) > self._cache_layers:
                self._cache.popitem(last=False)
        return pair

    def _apply(self, name: str, tensor: torch.Tensor, direction: int) -> torch.Tensor:
        found = self.entry(name)
        if found is None:
            return tensor
        layer, (role, shape) = found
        if layer >= self.dims.n_layers:
            raise InvalidInput(f"{name!r} is in layer {layer}, but the config has "
                               f"num_hidden_layers={self.dims.n_layers}; send the tensors of the published copy")
        if tuple(tensor.shape) != shape:
            raise InvalidInput(f"{name!r} has shape {list(tensor.shape)}, expected {list(shape)} for "
                               f"{self.adapter.architecture}; send the tensors of the published copy")
        if not ROLE_PARTS[role] & self.parts:
            return tensor
        secrets = self._secrets(layer)[direction]
        return ROLE_MAPS[role](secrets, self.dims, tensor.to(torch.float32))

    def forward(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """T_k on one parameter tensor (or a perturbation of it)."""
        return self._apply(name, tensor, 0)

    def inverse(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """T_k⁻¹ on one tensor: brings an uploaded delta back to the original coordinates."""
        return self._apply(name, tensor, 1)
