"""Fixtures of the server tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def base_dir(tmp_path):
    """A public base model of the tiny model's shape: with center clipping relative to it, a job's
    privacy report has an ε."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    return tmp_path / "base"
