"""The engine's cache sizes by default, torch-free so settings and command lines can show them."""

from __future__ import annotations

DEFAULT_MAX_LORAS = 4  # adapters resident in the model at once
DEFAULT_MAX_CPU_LORAS = 16  # adapters held in host memory, resident ones included
DEFAULT_MAX_LORA_RANK = 256
