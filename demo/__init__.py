"""The offline small-model path (DESIGN.md §9): fictitious authors, a BPE tokenizer, a tiny Llama.

    authors     generate_authors, write_dataset — TOFU-shaped splits from a seed (no torch)
    tokenizer   train_tokenizer — byte-level BPE, saved for AutoTokenizer.from_pretrained
    tiny_model  tiny_llama_config, build_model, finetune
    assets      build_or_load, tiny_assets, DemoAssets — everything above, built once and cached

Names are imported lazily so that `pum.demo.authors` does not pull in torch.
"""

from importlib import import_module

_EXPORTS = {
    "generate_authors": "authors", "write_dataset": "authors",
    "train_tokenizer": "tokenizer",
    "tiny_llama_config": "tiny_model", "build_model": "tiny_model", "finetune": "tiny_model",
    "build_or_load": "assets", "tiny_assets": "assets", "DemoAssets": "assets", "TrainSpec": "assets",
    "default_cache_dir": "assets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pum.demo' has no attribute {name!r}")
    return getattr(import_module(f"pum.demo.{_EXPORTS[name]}"), name)
