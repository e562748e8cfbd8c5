"""Which model a checkpoint is for: its tensors matched, by name and shape, to the architecture's own.

Workers build the model from the served config and subtract the copy from its trained state
tensor by tensor, so the copy must carry the model's own names. At job creation the server
builds the model on the meta device (shapes only, no memory) and matches the checkpoint to it:

- transformers' own renames of older layouts are applied (GPT-NeoX's `embed_out` → `lm_head`,
  GPT-2 saved without its `transformer.` prefix, `LayerNorm.gamma` → `.weight`, ...); a key that
  needs more than a rename (experts merged into one tensor, fused projections split) is refused;
- tensors transformers itself ignores when loading are dropped: the old buffers a model lists
  as ignorable (GPT-2's `attn.bias`, per-layer `rotary_emb.inv_freq`) and second names of a tied
  weight (the `lm_head.weight` of a model that shares it with its embeddings; it may be absent);
- anything else missing, left over or of another shape is refused, every difference listed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from pum.common.codec import TensorInfo
from pum.common.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointMatch:
    names: dict[str, str]  # checkpoint name → the model's name, for every tensor kept, in checkpoint order
    dropped: list[str] = field(default_factory=list)  # checkpoint tensors transformers would not load


def match_checkpoint(model_dir: Path, infos: list[TensorInfo]) -> CheckpointMatch:
    """Match the checkpoint's tensors to the model its config.json describes; InvalidInput lists every difference."""
    model = meta_model(model_dir)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    rename = _renamer(model, expected)
    renamed = {info.name: rename(info.name) for info in infos}
    names = {source: target for source, (target, converted) in renamed.items() if not converted}
    present = set(names.values())
    tied_copies, tied_covered = _tied(model, present)
    unexpected = present - set(expected)
    ignored, missing = _ignored_by_transformers(model, unexpected, set(expected) - present - tied_covered)
    problems = _differences(
        needs_conversion=[source for source, (_, converted) in renamed.items() if converted],
        names=names, unexpected=unexpected - ignored, missing=missing,
        shapes={info.name: info.shape for info in infos}, expected=expected,
    )
    if problems:
        raise InvalidInput(
            f"the weights in {model_dir} do not fit the {type(model).__name__} its config.json describes: "
            + "; ".join(problems) + ". Give the folder the config of these weights (or re-save the model with save_pretrained)"
        )
    kept = {source: target for source, target in names.items() if target not in ignored | tied_copies}
    dropped = [source for source in names if source not in kept]
    if moved := {s: t for s, t in kept.items() if s != t}:
        log.info("%s: %d tensors renamed to the model's names, e.g. %s", model_dir, len(moved), next(iter(moved.items())))
    if dropped:
        log.info("%s: dropped %d tensors transformers does not load: %s", model_dir, len(dropped), _listed(dropped))
    return CheckpointMatch(kept, dropped)


def _tied(model: torch.nn.Module, present: set[str]) -> tuple[set[str], set[str]]:
    """(names to drop, names that may be absent) for parameters the model shares between names.

    Tied weights are one tensor under several names (`lm_head.weight` and the embeddings): the
    checkpoint needs one of them; the first present in the model's order is kept, the others dropped.
    """
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(tensor), []).append(name)
    copies, covered = set(), set()
    for group in (names for names in by_tensor.values() if len(names) > 1):
        found = [name for name in group if name in present]
        if found:
            copies.update(found[1:])
            covered.update(group)
    return copies, covered


def _differences(*, needs_conversion, names, unexpected, missing, shapes, expected) -> list[str]:
    """Every way the checkpoint differs from the model, one phrase each (empty when it fits)."""
    problems = []
    if needs_conversion:
        problems.append(f"tensors transformers converts on load (more than a rename): {_listed(needs_conversion)}")
    by_target: dict[str, list[str]] = {}
    for source, target in names.items():
        by_target.setdefault(target, []).append(source)
    if twice := [f"{', '.join(sources)} → {target}" for target, sources in by_target.items() if len(sources) > 1]:
        problems.append(f"tensors that name the same parameter: {_listed(twice)}")
    if unexpected:
        problems.append(f"tensors the model does not have: {_listed(sorted(unexpected))}")
    if missing:
        problems.append(f"parameters missing from the checkpoint: {_listed(sorted(missing))}")
    misshapen = [
        f"{source} is {list(shapes[source])}, the model's {target} is {list(expected[target])}"
        for source, target in names.items() if target in expected and shapes[source] != expected[target]
    ]
    if misshapen:
        problems.append(f"shapes that differ: {_listed(misshapen)}")
    return problems


def meta_model(model_dir: Path) -> torch.nn.Module:
    """The causal LM of the folder's config.json on the meta device (built-in classes only).

    Built once per config.json content (the module is only read: names, shapes, ties, transformers'
    rules): a server that takes many jobs of one model builds it once (~6 ms each for a tiny Llama)."""
    try:
        text = (model_dir / "config.json").read_bytes()
    except OSError as err:
        raise InvalidInput(f"{model_dir}/config.json cannot be read: {err.strerror}") from None
    with _META_LOCK:
        model = _META_MODELS.get(text)
    if model is None:
        model = _build_meta_model(model_dir)
        with _META_LOCK:
            _META_MODELS[text] = model
            while len(_META_MODELS) > META_MODELS_KEPT:
                _META_MODELS.pop(next(iter(_META_MODELS)))
    return model


META_MODELS_KEPT = 8  # distinct configs; a meta model holds no weights
_META_MODELS: dict[bytes, torch.nn.Module] = {}
_META_LOCK = threading.Lock()


def _build_meta_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise InvalidInput(
            f"{model_dir}/config.json does not describe a causal language model transformers can build: "
            f"{str(err)[:300]}"
        ) from None


def _renamer(model: torch.nn.Module, expected: dict[str, tuple[int, ...]]):
    """name → (the model's name, whether the key needs a conversion beyond renaming), by transformers' rules."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion maps: names must already match
        return lambda name: (name, False)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(name: str) -> tuple[str, bool]:
        target, converter = rename_source_key(name, renamings, converters, prefix, expected)
        return target, converter is not None

    return rename


def _ignored_by_transformers(model, unexpected: set[str], missing: set[str]) -> tuple[set[str], set[str]]:
    """(unexpected names transformers ignores, missing names it does not ignore), by the model's own rules."""
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is None:  # an older transformers: ignore nothing
        return set(), missing
    info = SimpleNamespace(missing_keys=set(missing), unexpected_keys=set(unexpected))
    adjust(info)
    return unexpected - info.unexpected_keys, info.missing_keys


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
