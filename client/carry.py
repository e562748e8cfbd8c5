"""What a data owner carries across the rounds of a job, kept on the worker's disk (DESIGN.md §6).

    <carry_dir>/<task>/<job_id>/
        reference.safetensors     the first copy of round 1 the data owner received: every later
                                  round's reference model (NPO, DPO, UNDIAL, RMU, KL retain terms)
        optimizer-r{r}.safetensors  the optimiser state at the end of round r: every copy of round
                                  r + 1 starts from it (moments as tensors, the rest as JSON in the
                                  safetensors header; nothing is unpickled)

Several workers of one data owner may share the folder (one machine, or a shared file system):
every file is written under a unique temporary name and linked into place, so a reader sees a
whole file or none, and the first writer wins (at κ = 0 every copy of a round is identical, so any
copy's state is the right one; with noise, any copy of round r is a legitimate end of round r).
A state is written before the copy's upload: the upload that completes a round lets the server
publish round r + 1 at once, and a worker leasing it must find the state. Files of rounds before
r − 1 are removed when round r's is written; the folder is removed when the job ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pum.client.methods import frozen_reference, get_method, parse_params
from pum.client.trainer import Carried, TrainConfig

log = logging.getLogger(__name__)

FORMAT = 1
REFERENCE = "reference.safetensors"
_META_KEY = "pum_optimizer_state"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_STATE_FILE = re.compile(r"^optimizer-r(\d+)\.safetensors$")


def check_name(kind: str, name: str) -> str:
    """`name` when it is a safe single path component (letters, digits, '.', '_', '-'); ValueError otherwise."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} {name!r} is not a safe folder name (1-200 letters, digits, '.', '_', '-')")
    return name


def encode_optimizer_state(state: dict[int, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors named "<param index>/<key>", the other values as JSON) of `optimizer.state_dict()["state"]`."""
    tensors, other = {}, {}
    for index, values in state.items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{int(index)}/{key}"] = value.detach().to("cpu").contiguous()
            elif value is None or isinstance(value, (bool, int, float, str)):
                other.setdefault(str(int(index)), {})[key] = value
            else:
                raise ValueError(f"optimiser state {index}/{key} is a {type(value).__name__}: only tensors and plain values carry")
    return tensors, other


def decode_optimizer_state(tensors: dict[str, torch.Tensor], other: dict) -> dict[int, dict[str, Any]]:
    """The inverse of `encode_optimizer_state`; ValueError on a malformed name."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, sep, key = name.partition("/")
        if not sep or not index.isdigit() or not key:
            raise ValueError(f"optimiser state tensor {name!r}: expected '<param index>/<key>'")
        state.setdefault(int(index), {})[key] = tensor
    for index, values in other.items():
        if not index.isdigit() or not isinstance(values, dict):
            raise ValueError(f"optimiser state entry {index!r}: expected a parameter index and a mapping")
        state.setdefault(int(index), {}).update(values)
    return state


def _link_into_place(tmp: Path, path: Path) -> bool:
    """Move the finished `tmp` to `path` unless `path` exists (first writer wins); True if `tmp` won."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: rename, still whole files only
        if path.exists():
            return False
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


class CarryStore:
    """One job's carried state in `root` (created on first write)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def for_job(cls, carry_dir: Path, task: str, job_id: str) -> CarryStore:
        """The store of job `job_id` of task `task` under `carry_dir`; both names are checked (they come from the server)."""
        return cls(Path(carry_dir) / check_name("task name", task) / check_name("job id", job_id))

    # ---- reference
    @property
    def reference_path(self) -> Path:
        return self.root / REFERENCE

    def has_reference(self) -> bool:
        return self.reference_path.is_file()

    def keep_reference(self, copy_file: Path) -> bool:
        """Keep `copy_file` (a received copy, safetensors) as the job's reference unless one is kept already.

        True when this call stored it."""
        if self.has_reference():  # the usual case after the first copy: no copy of a model-sized file
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(self.reference_path)
        shutil.copyfile(copy_file, tmp)
        _fsync(tmp)
        return _link_into_place(tmp, self.reference_path)

    def load_reference(self) -> dict[str, torch.Tensor]:
        """The reference's tensors (CPU)."""
        return load_file(self.reference_path)

    # ---- optimiser state
    def state_path(self, round_: int) -> Path:
        return self.root / f"optimizer-r{round_}.safetensors"

    def save_optimizer_state(self, round_: int, state: dict[int, dict[str, Any]]) -> bool:
        """Keep `state` as the end of round `round_` unless a copy of that round kept one first; drop rounds < r − 1.

        True when this call stored it."""
        self.root.mkdir(parents=True, exist_ok=True)
        tensors, other = encode_optimizer_state(state)
        path = self.state_path(round_)
        tmp = _temporary(path)
        header = json.dumps({"format": FORMAT, "round": round_, "other": other})
        save_file(tensors, str(tmp), metadata={_META_KEY: header})
        _fsync(tmp)
        stored = _link_into_place(tmp, path)
        for old in self.root.iterdir():
            match = _STATE_FILE.match(old.name)
            if match and int(match.group(1)) < round_ - 1:
                old.unlink(missing_ok=True)
        return stored

    def load_optimizer_state(self, round_: int) -> dict[int, dict[str, Any]] | None:
        """The optimiser state at the end of round `round_`, or None when no copy of that round left one.

        ValueError when the file is not one this module wrote (format, round, names)."""
        path = self.state_path(round_)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        try:
            header = json.loads(metadata[_META_KEY])
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: no optimiser-state header ({err}); delete the file to start afresh") from err
        if header.get("format") != FORMAT or header.get("round") != round_:
            raise ValueError(f"{path}: format {header.get('format')!r}, round {header.get('round')!r}; "
                             f"expected format {FORMAT}, round {round_}")
        return decode_optimizer_state(load_file(path), header.get("other", {}))

    def remove(self) -> None:
        """Forget the job's carried state (the job has ended)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def reference_file(store: CarryStore, config: TrainConfig, copy_file: Path, round_: int) -> Path | None:
    """The file a copy of round `round_` builds its reference model from; None when the method reads none.

    With `carry_reference` on: round 1 keeps its copy as the job's reference (first copy wins) and
    trains against that copy; later rounds read the kept one. A data owner that joins after round 1
    has none: this copy becomes the reference, with a warning. With it off: the copy itself.
    Reparameterizations preserve the function, so a reference in another copy's basis gives the same
    log-probabilities and residual-stream hidden states.
    """
    method = get_method(config.method)
    if not method.uses_reference(parse_params(method, config.params)):
        return None
    if not config.carry_reference:
        return copy_file
    if round_ > 1 and store.has_reference():
        return store.reference_path
    if round_ > 1:
        log.warning("round %d: no reference kept from round 1 in %s (this data owner joined late): "
                    "this copy becomes the job's reference", round_, store.root)
    store.keep_reference(copy_file)
    return copy_file


def carried_optimizer_state(store: CarryStore, config: TrainConfig, round_: int) -> dict[int, dict[str, Any]] | None:
    """The optimiser state a copy of round `round_` starts from: the end of round r − 1 (`carry_optimizer` on,
    round > 1), or None (with a warning when round r − 1 left none)."""
    if not (config.carry_optimizer and round_ > 1):
        return None
    state = store.load_optimizer_state(round_ - 1)
    if state is None:
        log.warning("round %d: no optimiser state from round %d in %s (this data owner joined late): "
                    "starting it afresh", round_, round_ - 1, store.root)
    return state


def carried_for_copy(store: CarryStore, config: TrainConfig, model: torch.nn.Module, copy_file: Path,
                     round_: int) -> Carried:
    """The `Carried` a copy of round `round_` starts from, taken from `store` (call it before training):
    the reference of `reference_file` (a frozen twin of `model`; None when it is the copy itself, which
    the trainer copies) and the optimiser state of `carried_optimizer_state`."""
    carried = Carried()
    source = reference_file(store, config, copy_file, round_)
    if source is not None and source != copy_file:
        carried.reference = frozen_reference(model)
        load_weights_inplace(carried.reference, store.load_reference())
    carried.optimizer_state = carried_optimizer_state(store, config, round_)
    return carried


def weight_mismatches(model: torch.nn.Module, shapes: dict[str, torch.Size]) -> dict[str, list[str]]:
    """How tensors of these names and shapes fail to cover `model`'s weights: {"unknown", "other shapes",
    "missing"} → names (empty lists when they fit). A tied weight absent from `shapes` follows its twin."""
    expected = model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False))
    given = {id(params[n]) for n in shapes if n in params}
    return {
        "unknown": sorted(set(shapes) - set(expected)),
        "other shapes": sorted(n for n in set(shapes) & set(expected) if tuple(shapes[n]) != tuple(expected[n].shape)),
        "missing": sorted(n for n in set(expected) - set(shapes) if n not in params or id(params[n]) not in given),
    }


@torch.no_grad()
def load_weights_inplace(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a copy file's tensors into `model`; ValueError unless they cover every weight the model has
    (a tied weight absent from the file follows its twin) with the same shapes. The model is unchanged on error."""
    problems = weight_mismatches(model, {name: tensor.shape for name, tensor in tensors.items()})
    if any(problems.values()):
        raise ValueError(f"the kept reference does not fit this copy (unknown {problems['unknown'][:3]}, other shapes "
                         f"{problems['other shapes'][:3]}, missing {problems['missing'][:3]}): delete the job's carry "
                         "folder if the job was recreated")
    model.load_state_dict(tensors, strict=False)
