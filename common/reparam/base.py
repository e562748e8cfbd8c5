"""Architecture adapters: the dimensions read from config.json, the map of the tensors a layer's
transform touches, the layout check, and the registry (DESIGN.md §4).

Each adapter holds ONE explicit map per architecture, `layer_map(dims)`: tensor name inside a
decoder block (`self_attn.q_proj.weight`) → `Entry(role, shape)`. The role says which map moves
the tensor (see `transform.ROLE_MAPS`); `KEEP` marks a known tensor of a touched module that the
transform leaves alone (an output bias), so that a tensor the map does not know, in a module it
touches, is refused rather than silently skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from pum.common.codec import TensorInfo
from pum.common.errors import InvalidInput

# Parts of the transform that can be switched on or off.
QK, VO, FFN = "qk", "vo", "ffn"
ALL_PARTS = frozenset({QK, VO, FFN})

# Roles: which rows or columns of a tensor move, and with which secret.
Q, K, V, O = "q", "k", "v", "o"            # query rows, key rows, value rows, output-projection columns
FFN_IN, FFN_OUT = "ffn_in", "ffn_out"      # gate/up rows, down columns
QKV, GATE_UP = "qkv", "gate_up"            # fused rows [q; k; v] and [gate; up] (Phi-3)
KEEP = "keep"                              # known and untouched (o_proj / down_proj biases)

# The parts that move each role (a fused role is touched when any of its parts is on).
ROLE_PARTS: dict[str, frozenset[str]] = {
    Q: frozenset({QK}), K: frozenset({QK}), V: frozenset({VO}), O: frozenset({VO}),
    FFN_IN: frozenset({FFN}), FFN_OUT: frozenset({FFN}), QKV: frozenset({QK, VO}), GATE_UP: frozenset({FFN}),
    KEEP: frozenset(),
}

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _rotary_factor(config: dict) -> float:
    """partial_rotary_factor at the top level (transformers 4) or in rope_parameters / rope_scaling."""
    for holder in (config, config.get("rope_parameters") or {}, config.get("rope_scaling") or {}):
        if isinstance(holder, dict) and holder.get("partial_rotary_factor") is not None:
            return float(holder["partial_rotary_factor"])
    return 1.0


@dataclass(frozen=True)
class Dims:
    """What the maps need from config.json; `head_dim` from the config when it has one."""

    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary_dim: int       # the first rotary_dim coordinates of a head see RoPE (rotate_half)
    intermediate: int
    attention_bias: bool  # the config's `attention_bias` (Llama, Qwen3, Gemma)
    mlp_bias: bool        # the config's `mlp_bias` (Llama)

    @classmethod
    def from_config(cls, config: dict) -> Dims:
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if missing := [key for key in required if not isinstance(config.get(key), int) or config[key] <= 0]:
            raise InvalidInput(f"config.json needs positive integers {missing} for reparameterization; "
                               "send the model's own config.json")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise InvalidInput(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        rotary_dim = int(head_dim * _rotary_factor(config))
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise InvalidInput(f"head_dim × partial_rotary_factor must be an even number in (0, head_dim={head_dim}] "
                               f"(got {rotary_dim}); check head_dim and partial_rotary_factor in config.json")
        return cls(hidden, config["num_hidden_layers"], heads, kv_heads, head_dim, rotary_dim,
                   config["intermediate_size"], bool(config.get("attention_bias")), bool(config.get("mlp_bias")))

    @property
    def q_rows(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.n_kv_heads * self.head_dim


class Entry(NamedTuple):
    role: str
    shape: tuple[int, ...]


LayerMap = Callable[[Dims], dict[str, Entry]]


@dataclass(frozen=True)
class Adapter:
    """How one architecture is reparameterized. `parts` are the parts that preserve its function."""

    architecture: str            # config.json `architectures[0]`, e.g. "LlamaForCausalLM"
    model_type: str              # config.json `model_type`, e.g. "llama"
    layer_map: LayerMap          # the one map of the tensors a layer's transform touches
    parts: frozenset[str] = ALL_PARTS
    layer_prefix: str = "model.layers."
    notes: str = ""              # what is restricted, and why

    def dims(self, config: dict) -> Dims:
        return Dims.from_config(config)

    def locate(self, name: str) -> tuple[int, str] | None:
        """(layer index, name inside the layer) for a tensor under `layer_prefix`, else None."""
        match = re.match(re.escape(self.layer_prefix) + r"(\d+)\.(.+)$", name)
        return (int(match.group(1)), match.group(2)) if match else None

    def expected(self, config: dict) -> dict[str, Entry]:
        """Every touched tensor of the model, by full name."""
        dims = self.dims(config)
        layer = self.layer_map(dims)
        return {f"{self.layer_prefix}{i}.{suffix}": entry
                for i in range(dims.n_layers) for suffix, entry in layer.items()}

    def check_layout(self, config: dict, infos: Iterable[TensorInfo]) -> None:
        """Refuse, in one InvalidInput listing EVERY problem, a checkpoint whose touched tensors are
        missing, mis-shaped or not floating point, that has layers past `num_hidden_layers`, or
        that has a tensor the map does not know inside a module the transform touches."""
        dims = self.dims(config)
        expected, got = self.expected(config), {info.name: info for info in infos}
        modules = {suffix.rsplit(".", 1)[0] for suffix in self.layer_map(dims)}
        problems, count = [], 0
        if missing := sorted(expected.keys() - got.keys()):
            problems.append(f"missing {missing}")
            count += len(missing)
        for name in sorted(expected.keys() & got.keys()):
            info, shape = got[name], expected[name].shape
            if info.shape != shape or info.dtype not in _FLOAT_DTYPES:
                problems.append(f"{name!r} is {info.describe()}, expected a float tensor of shape {list(shape)}")
                count += 1
        extra_layers, unknown = set(), []
        for name in sorted(got.keys() - expected.keys()):
            if (where := self.locate(name)) is None:
                continue
            layer, suffix = where
            if layer >= dims.n_layers:
                extra_layers.add(layer)
            elif suffix.rsplit(".", 1)[0] in modules:
                unknown.append(name)
        if extra_layers:
            problems.append(f"layers {sorted(extra_layers)} beyond num_hidden_layers={dims.n_layers}")
            count += len(extra_layers)
        if unknown:
            problems.append(f"tensors the {self.architecture} map does not know in modules it transforms {unknown}")
            count += len(unknown)
        if problems:
            raise InvalidInput(f"the checkpoint does not match the {self.architecture} reparameterization layout "
                               f"({count} problem(s)): " + "; ".join(problems)
                               + "; fix the checkpoint or its config.json, or turn reparameterization off")


# --- registry ------------------------------------------------------------------------------------

_ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Add an adapter under its architecture name; refuses a second one for the same name."""
    if adapter.architecture in _ADAPTERS:
        raise ValueError(f"an adapter for {adapter.architecture} is already registered")
    _ADAPTERS[adapter.architecture] = adapter
    return adapter


def supported_architectures() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(config: dict) -> Adapter:
    """The adapter for a config.json (as a dict): by `architectures[0]`, or by `model_type` when
    the config names no architecture. An unknown architecture is refused, naming it."""
    if not isinstance(config, dict):
        raise InvalidInput(f"config must be the model's config.json as an object (got {type(config).__name__})")
    architectures = config.get("architectures") or []
    if architectures:
        architecture = architectures[0]
        if architecture in _ADAPTERS:
            return _ADAPTERS[architecture]
    else:
        model_type = config.get("model_type")
        by_type = [adapter for adapter in _ADAPTERS.values() if adapter.model_type == model_type]
        if by_type:
            return by_type[0]
        architecture = f"model_type {model_type!r}"
    raise InvalidInput(f"reparameterization has no adapter for {architecture}; supported architectures: "
                       f"{supported_architectures()}; turn use_orthogonal_reparam off for this model")
