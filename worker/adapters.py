"""From a job's adapter name to the engine's LoRARequest, only ever under the worker's roots."""

from __future__ import annotations

import os
from collections.abc import Sequence

from omni_engine.errors import AdapterAccessError, AdapterNotFoundError
from omni_engine.lora.request import LoRARequest
from producer.adapter_roots import adapter_name_problem, is_remote, resolve_local
from producer.errors import AdapterNameError
from producer.output_uri import S3Location, parse_output_uri
from worker.adapter_cache import AdapterCache


class AdapterResolver:
    """Resolves names like `styles/watercolor` against each root in turn; the first hit wins.

    A root is a directory or `s3://bucket/prefix`; an adapter found under an s3:// root is fetched
    into `cache` first (`worker.adapter_cache`), and its path is the local copy's. The canonical
    path it returns is also what the engine reports for held adapters, so the scheduler can
    compare the two.
    """

    def __init__(self, roots: Sequence[str], *, cache: AdapterCache | None = None) -> None:
        self.roots: tuple[str | S3Location, ...] = tuple(
            parse_output_uri(root) if is_remote(root) else os.path.realpath(root) for root in roots
        )
        if cache is None and any(isinstance(root, S3Location) for root in self.roots):
            raise ValueError("adapter roots in object storage need an adapter cache to fetch into")
        self._cache = cache
        self._ids: dict[str, int] = {}

    def resolve(self, name: str) -> LoRARequest:
        if not self.roots:
            raise AdapterNotFoundError(name, "the worker has no adapter roots (set OMNI_ADAPTER_ROOTS)")
        problem = adapter_name_problem(name)
        if problem is not None:
            raise AdapterAccessError(name, problem)
        for root in self.roots:
            path = self._find(root, name)
            if path is not None:
                lora_id = self._ids.setdefault(path, len(self._ids) + 1)
                return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)
        raise AdapterNotFoundError(name, f"not found under the adapter roots ({len(self.roots)} searched)")

    def _find(self, root: str | S3Location, name: str) -> str | None:
        """The local path of a directory or one weights file, or None when the root has nothing there."""
        if isinstance(root, S3Location):
            remote = self._cache.find(root, name)
            return str(self._cache.fetch(remote, adapter=name)) if remote is not None else None
        try:
            return resolve_local(root, name)
        except AdapterNameError as e:
            raise AdapterAccessError(name, str(e)) from None
