"""What of a Hugging Face model folder travels to a worker, and what in it is refused.

Both sides use these rules: the server publishes only `PUBLIC_FILES` (config, generation config,
tokenizer files) and refuses a model whose config loads code; a worker accepts only plain file
names and a task name that is one safe path segment, and refuses a served config that loads code.

A config "loads code" when transformers would import or fetch something beyond its own built-in
classes and the weights: `auto_map` (custom classes from .py files, in config.json or
tokenizer_config.json), a hub kernel as attention or experts implementation ("org/repo", loaded
through the `kernels` package), a `quantization_config` (quantizers pull kernels and packages;
a PUM copy is never quantized), or `use_pretrained_backbone` (weights fetched from a hub).
Python files and pickles never travel: they are not in PUBLIC_FILES.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# The files a worker needs to build the model and its tokenizer; everything else stays home
# (weights, READMEs, licences, .gitattributes, stale .bin indexes, original/, Python files).
PUBLIC_FILES = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "tekken.json", "chat_template.jinja", "chat_template.json",
})
MAX_NAME_BYTES = 255  # a file name's limit on Linux, macOS and Windows file systems
# A task names a folder (saves/unlearn/<task>/): one segment, no leading dot, no separator.
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_BUILT_IN_IMPLEMENTATION = re.compile(r"[a-z0-9_|]+")  # "sdpa", "flash_attention_2", "paged|sdpa"


def is_plain_file_name(name: object) -> bool:
    """A name that stays in the folder it is joined to: letters, digits, '_', '.', '+', '-',
    starting with a letter or digit (so no '..', no dotfile, no separator, no NUL), ≤ 255 bytes."""
    return (
        isinstance(name, str) and _PLAIN_NAME.fullmatch(name) is not None
        and len(name.encode()) <= MAX_NAME_BYTES
    )


def is_task_name(name: object) -> bool:
    return isinstance(name, str) and TASK_NAME.fullmatch(name) is not None


def code_loading_keys(config: object, where: str = "") -> list[str]:
    """The places in a parsed config (any depth) that would make transformers load code; [] if none."""
    found = []
    for path, key, value in _items(config, where):
        if key == "auto_map":
            found.append(f"{path} (custom code classes)")
        elif key == "quantization_config" and value is not None:
            found.append(f"{path} (quantized models pull kernels and packages)")
        elif key == "use_pretrained_backbone" and value:
            found.append(f"{path} (fetches backbone weights from a hub)")
        elif key.endswith("implementation") and not _built_in(value):
            found.append(f"{path} = {value!r} (only transformers' built-in implementations)")
    return found


def _items(value: object, where: str) -> Iterator[tuple[str, str, object]]:
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            yield path, str(key), item
            yield from _items(item, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _items(item, f"{where}[{i}]")


def _built_in(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return _BUILT_IN_IMPLEMENTATION.fullmatch(value) is not None
    if isinstance(value, dict):  # per sub-config: {"text_config": "sdpa", ...}
        return all(_built_in(item) for item in value.values())
    return False
