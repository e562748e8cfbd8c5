"""The architectures PUM can reparameterize, each with its explicit layer map (DESIGN.md §4).

All six use `rotate_half` RoPE, `repeat_kv` grouping and the tensor names of their Hugging Face
classes under `model.layers.{i}.`. Embeddings, norms and `lm_head` are never touched.

Qwen3 applies an RMSNorm with one learned weight vector w (shared by all heads) to every query and
key head BEFORE RoPE. A plane rotation commutes with it only where w_t = w_{t+r/2} for both the
q_norm and the k_norm weights. Qwen3 therefore gets NO query/key rotation (parts = vo + ffn):
restricting to the planes with equal weights would make the secret depend on the weights (the
norm tensors would have to be read before q/k), would almost never find an equal pair in a
trained checkpoint, and would keep the function only while those weights stay equal, so SGD on
the norm weights would no longer commute with the map. V/O rotations and the FFN permutation do
not meet the norm and apply as for Llama.
"""

from __future__ import annotations

from pum.common.reparam.base import (
    FFN, FFN_IN, FFN_OUT, GATE_UP, KEEP, K, O, Q, QKV, V, VO, Adapter, Dims, Entry, register,
)


def attention_map(d: Dims, *, qkv_bias: bool, o_bias: bool) -> dict[str, Entry]:
    """Separate q/k/v/o projections, with biases as the architecture has them."""
    layer = {
        "self_attn.q_proj.weight": Entry(Q, (d.q_rows, d.hidden)),
        "self_attn.k_proj.weight": Entry(K, (d.kv_rows, d.hidden)),
        "self_attn.v_proj.weight": Entry(V, (d.kv_rows, d.hidden)),
        "self_attn.o_proj.weight": Entry(O, (d.hidden, d.q_rows)),
    }
    if qkv_bias:
        layer |= {
            "self_attn.q_proj.bias": Entry(Q, (d.q_rows,)),
            "self_attn.k_proj.bias": Entry(K, (d.kv_rows,)),
            "self_attn.v_proj.bias": Entry(V, (d.kv_rows,)),
        }
    if o_bias:
        layer["self_attn.o_proj.bias"] = Entry(KEEP, (d.hidden,))
    return layer


def mlp_map(d: Dims, *, bias: bool) -> dict[str, Entry]:
    """Separate gate/up/down projections."""
    layer = {
        "mlp.gate_proj.weight": Entry(FFN_IN, (d.intermediate, d.hidden)),
        "mlp.up_proj.weight": Entry(FFN_IN, (d.intermediate, d.hidden)),
        "mlp.down_proj.weight": Entry(FFN_OUT, (d.hidden, d.intermediate)),
    }
    if bias:
        layer |= {
            "mlp.gate_proj.bias": Entry(FFN_IN, (d.intermediate,)),
            "mlp.up_proj.bias": Entry(FFN_IN, (d.intermediate,)),
            "mlp.down_proj.bias": Entry(KEEP, (d.hidden,)),
        }
    return layer


def llama_map(d: Dims) -> dict[str, Entry]:
    """Llama: `attention_bias` on q/k/v/o, `mlp_bias` on gate/up/down."""
    return attention_map(d, qkv_bias=d.attention_bias, o_bias=d.attention_bias) | mlp_map(d, bias=d.mlp_bias)


def mistral_map(d: Dims) -> dict[str, Entry]:
    """Mistral: no biases."""
    return attention_map(d, qkv_bias=False, o_bias=False) | mlp_map(d, bias=False)


def qwen2_map(d: Dims) -> dict[str, Entry]:
    """Qwen2: q/k/v always have biases, o_proj and the MLP none."""
    return attention_map(d, qkv_bias=True, o_bias=False) | mlp_map(d, bias=False)


def gated_attention_bias_map(d: Dims) -> dict[str, Entry]:
    """Qwen3 and Gemma: `attention_bias` on q/k/v/o, no MLP bias."""
    return attention_map(d, qkv_bias=d.attention_bias, o_bias=d.attention_bias) | mlp_map(d, bias=False)


def phi3_map(d: Dims) -> dict[str, Entry]:
    """Phi-3: fused `qkv_proj` rows [q; k; v] and `gate_up_proj` rows [gate; up]; no biases."""
    return {
        "self_attn.qkv_proj.weight": Entry(QKV, (d.q_rows + 2 * d.kv_rows, d.hidden)),
        "self_attn.o_proj.weight": Entry(O, (d.hidden, d.q_rows)),
        "mlp.gate_up_proj.weight": Entry(GATE_UP, (2 * d.intermediate, d.hidden)),
        "mlp.down_proj.weight": Entry(FFN_OUT, (d.hidden, d.intermediate)),
    }


LLAMA = register(Adapter("LlamaForCausalLM", "llama", llama_map))
MISTRAL = register(Adapter("MistralForCausalLM", "mistral", mistral_map))
QWEN2 = register(Adapter("Qwen2ForCausalLM", "qwen2", qwen2_map))
QWEN3 = register(Adapter(
    "Qwen3ForCausalLM", "qwen3", gated_attention_bias_map, parts=frozenset({VO, FFN}),
    notes="no query/key rotation: the per-head q_norm/k_norm RMSNorm before RoPE does not commute with it",
))
GEMMA = register(Adapter("GemmaForCausalLM", "gemma", gated_attention_bias_map))
PHI3 = register(Adapter("Phi3ForCausalLM", "phi3", phi3_map))
