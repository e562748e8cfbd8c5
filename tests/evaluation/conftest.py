"""Shared fixtures of the evaluation tests: the tiny demo assets (data + fine-tuned model), built once."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def assets(demo_assets):
    return demo_assets[1]


@pytest.fixture(scope="session")
def loaded(assets):
    """(model, tokenizer) of the tiny fine-tuned model, in eval mode."""
    return assets.load_model(), assets.load_tokenizer()
