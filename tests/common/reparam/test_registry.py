"""Adapter lookup, dimensions from config.json, the layout check and part selection."""

from __future__ import annotations

import pytest

from pum.common.codec import TensorInfo
from pum.common.errors import InvalidInput
from pum.common.noise import job_key_from_seed
from pum.common.reparam import Adapter, CopyTransform, Dims, adapter_for, register, supported_architectures

import torch

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 12}


def infos_for(config: dict) -> list[TensorInfo]:
    adapter = adapter_for(config)
    return [TensorInfo(name, "F32", entry.shape) for name, entry in adapter.expected(config).items()] + [
        TensorInfo("model.embed_tokens.weight", "F32", (10, 8)),
        TensorInfo("model.layers.0.input_layernorm.weight", "F32", (8,)),
    ]


def test_lookup_by_architecture_then_model_type():
    assert adapter_for(LLAMA).architecture == "LlamaForCausalLM"
    assert adapter_for({"model_type": "qwen2"}).architecture == "Qwen2ForCausalLM"
    assert set(supported_architectures()) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                             "Qwen3ForCausalLM", "GemmaForCausalLM", "Phi3ForCausalLM"}


def test_unknown_architecture_is_refused_with_its_name_and_the_supported_ones():
    with pytest.raises(InvalidInput) as error:
        adapter_for({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    assert "GPT2LMHeadModel" in str(error.value) and "LlamaForCausalLM" in str(error.value)
    with pytest.raises(InvalidInput, match="'falcon'"):
        adapter_for({"model_type": "falcon"})
    # a known model_type does not let an unknown architecture through
    with pytest.raises(InvalidInput, match="LlamaForSequenceClassification"):
        adapter_for({**LLAMA, "architectures": ["LlamaForSequenceClassification"]})


def test_register_refuses_a_duplicate():
    with pytest.raises(ValueError, match="already registered"):
        register(Adapter("LlamaForCausalLM", "llama", lambda dims: {}))


def test_dims_read_head_dim_and_partial_rotary_factor_from_the_config():
    assert Dims.from_config(LLAMA).head_dim == 4
    assert Dims.from_config({**LLAMA, "head_dim": 6}).head_dim == 6
    assert Dims.from_config({**LLAMA, "head_dim": None}).head_dim == 4
    assert Dims.from_config({**LLAMA, "head_dim": 8, "partial_rotary_factor": 0.5}).rotary_dim == 4
    assert Dims.from_config({**LLAMA, "head_dim": 8, "rope_parameters": {"partial_rotary_factor": 0.25}}).rotary_dim == 2
    assert Dims.from_config({**LLAMA, "num_key_value_heads": None}).n_kv_heads == 2


@pytest.mark.parametrize("change, message", [
    ({"num_key_value_heads": 3, "num_attention_heads": 4}, "multiple of num_key_value_heads"),
    ({"hidden_size": None, "intermediate_size": 0}, "'hidden_size', 'intermediate_size'"),
    ({"head_dim": 4, "partial_rotary_factor": 0.25}, "even"),
])
def test_dims_refuse_inconsistent_configs(change, message):
    with pytest.raises(InvalidInput, match=message):
        Dims.from_config({**LLAMA, **change})


@pytest.mark.parametrize("config", [
    LLAMA,
    {**LLAMA, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3"},
    {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
    {**LLAMA, "attention_bias": True, "mlp_bias": True},
])
def test_a_matching_layout_passes(config):
    adapter_for(config).check_layout(config, infos_for(config))


def test_layout_check_reports_every_problem_at_once():
    dropped = {"model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"}
    infos = [info for info in infos_for(LLAMA) if info.name not in dropped]
    infos = [TensorInfo(i.name, i.dtype, (5, 8)) if i.name == "model.layers.0.self_attn.k_proj.weight" else i
             for i in infos]
    infos = [TensorInfo(i.name, "I64", i.shape) if i.name == "model.layers.1.self_attn.o_proj.weight" else i
             for i in infos]
    infos += [TensorInfo("model.layers.0.self_attn.q_proj.bias", "F32", (8,)),  # bias the config does not declare
              TensorInfo("model.layers.2.mlp.down_proj.weight", "F32", (8, 12))]
    with pytest.raises(InvalidInput) as error:
        adapter_for(LLAMA).check_layout(LLAMA, infos)
    message = str(error.value)
    assert "6 problem(s)" in message
    for fragment in ["missing ['model.layers.0.self_attn.q_proj.weight', 'model.layers.1.mlp.up_proj.weight']",
                     "k_proj.weight' is F32 [5, 8], expected a float tensor of shape [4, 8]",
                     "o_proj.weight' is I64", "layers [2] beyond num_hidden_layers=2",
                     "'model.layers.0.self_attn.q_proj.bias'", "LlamaForCausalLM"]:
        assert fragment in message, fragment


def test_layout_check_reports_a_missing_layer_by_name():
    infos = [info for info in infos_for(LLAMA) if not info.name.startswith("model.layers.1.")]
    with pytest.raises(InvalidInput, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        adapter_for(LLAMA).check_layout(LLAMA, infos)


def test_parts_are_checked_against_the_adapter():
    key = job_key_from_seed(0)
    qwen3 = {**LLAMA, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    with pytest.raises(InvalidInput, match="Qwen3ForCausalLM does not support parts \\['qk'\\]"):
        CopyTransform(adapter_for(qwen3), qwen3, key, 1, 0, parts={"qk", "vo"})
    with pytest.raises(InvalidInput, match="unknown reparameterization parts \\['embed'\\]"):
        CopyTransform(adapter_for(LLAMA), LLAMA, key, 1, 0, parts={"embed"})
    assert CopyTransform(adapter_for(qwen3), qwen3, key, 1, 0).parts == {"vo", "ffn"}


def test_forward_refuses_a_mis_shaped_tensor_and_passes_others_through():
    transform = CopyTransform(adapter_for(LLAMA), LLAMA, job_key_from_seed(0), 1, 0)
    with pytest.raises(InvalidInput, match="expected \\[4, 8\\]"):
        transform.forward("model.layers.0.self_attn.v_proj.weight", torch.zeros(8, 8))
    with pytest.raises(InvalidInput, match="num_hidden_layers=2"):
        transform.inverse("model.layers.7.self_attn.v_proj.weight", torch.zeros(4, 8))
    norm = torch.ones(8, dtype=torch.bfloat16)
    assert transform.forward("model.layers.0.input_layernorm.weight", norm) is norm
    assert transform.forward("lm_head.weight", norm) is norm


def test_secrets_are_cached_for_a_few_layers_only():
    config = {**LLAMA, "num_hidden_layers": 6}
    transform = CopyTransform(adapter_for(config), config, job_key_from_seed(0), 1, 0, cache_layers=2)
    w = torch.randn(4, 8)
    first = transform.forward("model.layers.0.self_attn.v_proj.weight", w)
    for layer in range(6):
        transform.forward(f"model.layers.{layer}.self_attn.v_proj.weight", w)
    assert len(transform._cache) == 2
    assert torch.equal(transform.forward("model.layers.0.self_attn.v_proj.weight", w), first)  # regenerated
