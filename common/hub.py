"""Hugging Face ids from the local cache: `open-unlearning/tofu_Llama-3.2-1B-Instruct_full` → its snapshot folder.

A model (or dataset) argument is a folder, or a Hugging Face id whose snapshot is already in the
local cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub), read with
`huggingface_hub.snapshot_download(local_files_only=True)`: nothing is ever downloaded. A name
that is neither is refused with the cache path it looked in.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pum.common.errors import InvalidInput

log = logging.getLogger(__name__)


def hub_cache_dir() -> Path:
    """The cache huggingface_hub reads (its constant, so HF_HOME / HF_HUB_CACHE apply as it applies them)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The cached snapshot folder of `repo_id` (its `main`), or None when the cache has none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError, ValueError):
        return None


def resolve_local(name: str | Path, what: str = "model", repo_type: str = "model") -> Path:
    """A folder: `name` itself when it is one, else the cached snapshot of the Hugging Face id `name`.

    InvalidInput naming the cache folder when it is neither (`what` names the argument).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    snapshot = cached_snapshot(text, repo_type) if text.count("/") <= 1 and not text.startswith((".", "/", "~")) else None
    if snapshot is not None:
        log.info("%s %s: the cached snapshot %s", what, text, snapshot)
        return snapshot
    raise InvalidInput(
        f"{what} {text!r} is neither a folder here nor a Hugging Face {repo_type} id in the local cache "
        f"{hub_cache_dir()} (set HF_HOME or HF_HUB_CACHE to the cache that holds it, or download it there first; "
        "PUM never downloads)"
    )
