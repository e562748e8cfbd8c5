"""T⁻¹(T(x)) = x for random tensors, keys, rounds, copies and architectures (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pum.common.reparam import CopyTransform, adapter_for

torch.set_num_threads(1)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "GemmaForCausalLM": "gemma", "Phi3ForCausalLM": "phi3", "MistralForCausalLM": "mistral"}


@st.composite
def configs(draw) -> dict:
    architecture = draw(st.sampled_from(sorted(ARCHITECTURES)))
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 6))
    return {
        "architectures": [architecture], "model_type": ARCHITECTURES[architecture],
        "hidden_size": draw(st.integers(1, 12)), "num_hidden_layers": 2, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "intermediate_size": draw(st.integers(1, 16)),
        "partial_rotary_factor": draw(st.sampled_from([1.0, 0.5])) if head_dim % 4 == 0 else 1.0,
        "attention_bias": draw(st.booleans()), "mlp_bias": draw(st.booleans()),
    }


@settings(max_examples=60, deadline=None)
@given(config=configs(), key=st.binary(min_size=1, max_size=32), round_=st.integers(1, 50),
       copy=st.integers(0, 20), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_inverse_undoes_forward(config, key, round_, copy, seed, scale):
    adapter = adapter_for(config)
    transform = CopyTransform(adapter, config, key, round_, copy)
    generator = torch.Generator().manual_seed(seed)
    for name, entry in adapter.expected(config).items():
        x = scale * torch.randn(entry.shape, generator=generator)
        y = transform.forward(name, x)
        assert y.shape == x.shape and y.dtype == torch.float32
        # the maps are orthogonal: they keep the Frobenius norm
        torch.testing.assert_close(y.norm(), x.norm(), rtol=1e-5, atol=0)
        torch.testing.assert_close(transform.inverse(name, y), x, atol=1e-6 * scale, rtol=0)
