"""Function-preserving reparameterizations T_k per architecture (DESIGN.md §4).

    adapter = adapter_for(config)                # config.json as a dict; unknown architectures refused
    adapter.check_layout(config, infos)          # every missing / mis-shaped tensor in one InvalidInput
    t = CopyTransform(adapter, config, key, round_, copy)
    published = t.forward(name, tensor)          # T_k on each published tensor, in any order
    delta = t.inverse(name, uploaded_delta)      # T_k⁻¹ on each uploaded delta

Modules: `maths` (pure functions), `base` (dimensions, adapter, layout check, registry),
`adapters` (the six architectures and their maps), `transform` (per-copy secrets and maps).
"""

from pum.common.reparam import adapters as _adapters  # noqa: F401  (registers the adapters)
from pum.common.reparam.base import (
    ALL_PARTS, FFN, QK, VO, Adapter, Dims, Entry, adapter_for, register, supported_architectures,
)
from pum.common.reparam.transform import CopyTransform, LayerSecrets

__all__ = [
    "ALL_PARTS", "FFN", "QK", "VO", "Adapter", "CopyTransform", "Dims", "Entry", "LayerSecrets",
    "adapter_for", "register", "supported_architectures",
]
