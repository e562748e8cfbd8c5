"""What a worker accepts from a server: the lease, the served files, the copy, the model they make.

The model owner is not trusted with the worker's machine. Before anything is written, a lease
must name plain files and a task that is one safe folder name; the served JSON files must not
make transformers load code (`pum.common.model_files.code_loading_keys`); the copy is parsed
with the server's own safetensors limits; the model is built with `trust_remote_code=False`,
from local files only, from safetensors only, and must match the copy tensor for tensor.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pum.common.codec import MAX_HEADER_BYTES, SafetensorsFile
from pum.common.model_files import PUBLIC_FILES, code_loading_keys, is_plain_file_name, is_task_name
from pum.common.schemas import LeaseGranted, TaskSpec

log = logging.getLogger(__name__)

# Largest public file a worker downloads: tokenizer.json files reach ~35 MB (Gemma 3 is 33 MB).
MAX_PUBLIC_FILE_BYTES = 128 * 2**20
_LEASE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # it goes into URL paths


class RefusedLease(ValueError):
    """The server sent something this worker will not act on; the lease is given back."""


@dataclass(frozen=True)
class Lease:
    id: str
    task_name: str  # names the folder saves_dir/<task>/
    job_id: str  # names the data owner's carry folder of the job (pum.client.carry)
    round: int
    ttl_s: float
    task: TaskSpec
    public_files: tuple[str, ...]  # the files to download: plain names from PUBLIC_FILES


def check_lease(reply: LeaseGranted | dict) -> Lease:
    """The lease of a 'leased' reply, or RefusedLease listing every unsafe field."""
    if isinstance(reply, LeaseGranted):  # parsed already: the types are right, the values are still checked
        reply = reply.model_dump()
    problems = []
    lease_id, task_name, job_id, round_, ttl_s = (reply.get(key) for key in ("lease_id", "task_name", "job_id", "round",
                                                                             "ttl_s"))
    if not is_lease_id(lease_id):
        problems.append(f"lease_id {_short(lease_id)} is not 1–128 letters, digits, '_' or '-'")
    if not is_task_name(task_name):
        problems.append(f"task_name {_short(task_name)} is not one safe folder name (letters, digits, '_', '.', '-')")
    if not is_task_name(job_id):
        problems.append(f"job_id {_short(job_id)} is not one safe folder name (letters, digits, '_', '.', '-')")
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 1:
        problems.append(f"round {_short(round_)} is not an integer ≥ 1")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not (0 < ttl_s and math.isfinite(ttl_s)):
        problems.append(f"ttl_s {_short(ttl_s)} is not a positive number of seconds")
    names = reply.get("public_files")
    if not isinstance(names, list):
        problems.append("public_files is not a list of file names")
        names = []
    unsafe = [name for name in names if not is_plain_file_name(name)]
    if unsafe:
        problems.append(f"public_files {_short(unsafe)} are not plain file names")
    elif "config.json" not in names:
        problems.append("public_files has no config.json")
    if problems:
        raise RefusedLease("refused lease: " + "; ".join(problems))
    if skipped := sorted(set(names) - PUBLIC_FILES):
        log.warning("lease %s: not downloading %s (a worker needs only config and tokenizer files)", lease_id, skipped)
    task = TaskSpec.model_validate(reply.get("task"))
    kept = tuple(name for name in dict.fromkeys(names) if name in PUBLIC_FILES)
    return Lease(lease_id, task_name, job_id, round_, float(ttl_s), task, kept)


def is_lease_id(value: object) -> bool:
    return isinstance(value, str) and _LEASE_ID.fullmatch(value) is not None


def check_served_files(folder: Path) -> None:
    """Refuse served JSON files (config, tokenizer config, ...) that are not JSON or would load code."""
    for path in sorted(folder.glob("*.json")):
        try:
            found = code_loading_keys(json.loads(path.read_text(encoding="utf-8")), path.name)
        except (ValueError, RecursionError):
            raise RefusedLease(f"served {path.name} is not UTF-8 JSON of a sane depth") from None
        if found:
            raise RefusedLease(f"served {path.name} would make transformers load code: {', '.join(found)}")


def read_copy(path: Path) -> dict[str, torch.Tensor]:
    """The copy's tensors, once its header passes the server's own checks (size limit, layout, file size).

    The tensors come from safetensors' `load_file`: file-backed pages, which the kernel may evict,
    rather than a second copy of the model in the worker's anonymous memory.
    """
    with SafetensorsFile(path, max_header_bytes=MAX_HEADER_BYTES):
        pass
    return load_file(path)


def load_served_model(folder: Path, device: str, received: dict[str, torch.Tensor]):
    """(model, tokenizer) from the served folder: built-in classes only, nothing fetched, no pickle.

    Refuses a copy that does not fit the served config (missing, extra or misshapen tensors).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    safe = {"trust_remote_code": False, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(folder, **safe)
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True,  # float32 weights for any copy: bf16 ones would
        # round away lr-sized updates (bf16_autocast makes the matmuls bf16, never the weights)
        output_loading_info=True, **safe,
    )
    state = model.state_dict()
    problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems["not in the model"] = sorted(set(received) - set(state))
    problems = {key: names for key, names in problems.items() if names}
    if problems:
        listed = "; ".join(f"{key}: {_short(names)}" for key, names in problems.items())
        raise RefusedLease(f"the copy does not fit the served config: {listed}")
    return model.to(device), tokenizer


def _short(value: object) -> str:
    """repr, cut to 200 characters: a hostile value must not flood the log."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"
