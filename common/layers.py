"""Layer groups: one decoder block per group, everything else in the global group (DESIGN.md §4)."""

from __future__ import annotations

import re

GLOBAL_GROUP = "global"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_group(tensor_name: str) -> str:
    """`layer.{i}` for every tensor under `…layers.{i}.`, else `global` (embeddings, final norm, lm_head)."""
    match = _LAYER.search(tensor_name)
    return f"layer.{int(match.group(1))}" if match else GLOBAL_GROUP


def group_names(tensor_names) -> list[str]:
    """The distinct groups of some tensors: layers in numeric order, then `global` if present."""
    groups = {layer_group(name) for name in tensor_names}
    layers = sorted((g for g in groups if g != GLOBAL_GROUP), key=lambda g: int(g.split(".")[1]))
    return layers + ([GLOBAL_GROUP] if GLOBAL_GROUP in groups else [])
