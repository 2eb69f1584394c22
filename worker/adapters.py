"""From a job's adapter name to the engine's LoRARequest, only ever under the worker's roots."""

from __future__ import annotations

import os
from collections.abc import Sequence

from omni_engine.errors import AdapterAccessError, AdapterNotFoundError
from omni_engine.lora.request import LoRARequest


class AdapterResolver:
    """Resolves names like `styles/watercolor` against each root in turn; the first hit wins.

    The canonical path it returns is also what the engine reports for held adapters, so the
    scheduler can compare the two.
    """

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = tuple(os.path.realpath(root) for root in roots)
        self._ids: dict[str, int] = {}

    def resolve(self, name: str) -> LoRARequest:
        if not self.roots:
            raise AdapterNotFoundError(name, "the worker has no adapter roots (set OMNI_ADAPTER_ROOTS)")
        for root in self.roots:
            candidate = os.path.realpath(os.path.join(root, name))
            if not (candidate == root or candidate.startswith(root + os.sep)):
                raise AdapterAccessError(name, "resolves outside the worker's adapter roots")
            if os.path.isdir(candidate) or os.path.isfile(candidate):  # a directory, or one weights file
                lora_id = self._ids.setdefault(candidate, len(self._ids) + 1)
                return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=candidate)
        raise AdapterNotFoundError(name, f"not found under the adapter roots ({len(self.roots)} searched)")
