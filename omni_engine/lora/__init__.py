"""LoRA handling, one concept per module: request, config, files, adapter, layers, LRU, manager."""

from omni_engine.lora.adapter import LoRAAdapter, read_adapter
from omni_engine.lora.lru import LRUCache
from omni_engine.lora.manager import LoRAInfo, LoRAManager
from omni_engine.lora.request import LoRARequest

__all__ = ["LRUCache", "LoRAAdapter", "LoRAInfo", "LoRAManager", "LoRARequest", "read_adapter"]
