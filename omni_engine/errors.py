"""The engine's exceptions: one base per concern, each message naming the adapter and the reason."""

from __future__ import annotations


class OmniError(Exception):
    """Base of every error the engine raises on purpose."""


class AdapterError(OmniError, ValueError):
    """A LoRA adapter cannot be used. `adapter` names it (its request name or path)."""

    def __init__(self, adapter: str, reason: str) -> None:
        self.adapter = adapter
        self.reason = reason
        super().__init__(f"adapter {adapter!r}: {reason}")


class AdapterNotFoundError(AdapterError):
    """No such adapter directory or weights file."""


class InvalidAdapterError(AdapterError):
    """Bad or missing config, missing or corrupt safetensors, non-finite weights, pickle-only weights."""


class IncompatibleAdapterError(AdapterError):
    """Applies to no layer of the model, shapes that do not fit it, or a rank above max_lora_rank."""


class AdapterAccessError(AdapterError):
    """The adapter (or a file in it) resolves outside the allowed adapter roots."""


class LoRACapacityError(OmniError, RuntimeError):
    """Every resident slot is pinned, so no other adapter can be activated."""


class ModelError(OmniError, ValueError):
    """The model cannot be loaded or does not support LoRA."""
