"""omni_engine: a diffusion engine that keeps many LoRA adapters cached, with vLLM-Omni's API.

Names are imported lazily so that light modules (the CLI's registration, errors) load without
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Omni": "omni_engine.engine",
    "OmniRequestOutput": "omni_engine.outputs",
    "LoRARequest": "omni_engine.lora.request",
}

__all__ = ["LoRARequest", "Omni", "OmniRequestOutput"]

if TYPE_CHECKING:
    from omni_engine.engine import Omni
    from omni_engine.lora.request import LoRARequest
    from omni_engine.outputs import OmniRequestOutput


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'omni_engine' has no attribute {name!r}")
