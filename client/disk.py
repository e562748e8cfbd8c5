"""A worker checks its temporary folder before it downloads a copy: a 7B copy is 13.5 GB in bf16 and
its float32 Δ 27 GB, and a full disk found halfway through costs the download and the lease.

The folder holds the copy (its Content-Length) and then Δ in float32: 4 bytes per parameter, with
parameters = copy bytes / the element size of the served config's dtype. A config without a dtype
counts 2-byte elements (bf16, fp16), which overestimates a float32 model's Δ rather than
underestimating a 16-bit one's. `TMPDIR` chooses the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ELEMENT_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}
UNKNOWN_ELEMENT_BYTES = 2
DELTA_ELEMENT_BYTES = 4  # Δ is uploaded in float32


class NotEnoughSpace(OSError):
    """A folder lacks the free space an operation needs; the message names both numbers."""


def served_element_bytes(folder: Path) -> int:
    """Bytes per parameter of the served model, from config.json's `dtype` (`torch_dtype` before transformers 5)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return UNKNOWN_ELEMENT_BYTES
    dtype = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return ELEMENT_BYTES.get(str(dtype).removeprefix("torch."), UNKNOWN_ELEMENT_BYTES)


def copy_bytes_needed(copy_bytes: int, element_bytes: int) -> int:
    """Bytes a copy of `copy_bytes` takes in the temporary folder: the copy, then its float32 Δ."""
    return copy_bytes + copy_bytes * DELTA_ELEMENT_BYTES // element_bytes


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """NotEnoughSpace unless `folder`'s file system has `needed` bytes free."""
    available = shutil.disk_usage(folder).free
    if needed > available:
        raise NotEnoughSpace(
            f"{what} needs {needed:,} bytes in {folder}, which has {available:,} available: free space there "
            "or point TMPDIR at a larger disk")


def check_copy_space(folder: Path, copy_bytes: int) -> None:
    """Before the first byte of a copy of `copy_bytes` arrives in `folder` (holding the served config)."""
    element = served_element_bytes(folder)
    check_free_space(folder, copy_bytes_needed(copy_bytes, element),
                     f"a copy of {copy_bytes:,} bytes and its float32 Δ ({element}-byte weights)")
