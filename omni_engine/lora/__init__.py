"""LoRA handling, one concept per module: request, config, files, adapter, layers, LRU, manager.

Names are imported lazily, as in `omni_engine`: `omni_engine.lora.request` and
`omni_engine.lora.source` need no torch, so a producer can build a LoRARequest without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "AdapterSource": "omni_engine.lora.source",
    "LRUCache": "omni_engine.lora.lru",
    "LoRAAdapter": "omni_engine.lora.adapter",
    "LoRAInfo": "omni_engine.lora.manager",
    "LoRAManager": "omni_engine.lora.manager",
    "LoRARequest": "omni_engine.lora.request",
    "read_adapter": "omni_engine.lora.adapter",
}

__all__ = [
    "AdapterSource",
    "LRUCache",
    "LoRAAdapter",
    "LoRAInfo",
    "LoRAManager",
    "LoRARequest",
    "read_adapter",
]

if TYPE_CHECKING:
    from omni_engine.lora.adapter import LoRAAdapter, read_adapter
    from omni_engine.lora.lru import LRUCache
    from omni_engine.lora.manager import LoRAInfo, LoRAManager
    from omni_engine.lora.request import LoRARequest
    from omni_engine.lora.source import AdapterSource


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'omni_engine.lora' has no attribute {name!r}")
