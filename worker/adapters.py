"""From a job's adapter name to the engine's LoRARequest, only ever under the worker's roots."""

from __future__ import annotations

import os
from collections.abc import Sequence

from omni_engine.errors import AdapterAccessError, AdapterNotFoundError
from omni_engine.lora.request import LoRARequest
from producer.adapter_roots import adapter_name_problem, resolve_local
from producer.errors import AdapterNameError


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
        problem = adapter_name_problem(name)
        if problem is not None:
            raise AdapterAccessError(name, problem)
        for root in self.roots:
            try:
                path = resolve_local(root, name)
            except AdapterNameError as e:
                raise AdapterAccessError(name, str(e)) from None
            if path is not None:
                lora_id = self._ids.setdefault(path, len(self._ids) + 1)
                return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)
        raise AdapterNotFoundError(name, f"not found under the adapter roots ({len(self.roots)} searched)")
