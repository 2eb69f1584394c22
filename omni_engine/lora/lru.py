"""A generic LRU cache with pinning. It knows nothing of models: the owner frees evicted values.

A cache whose every entry is pinned refuses a new one with LoRACapacityError, the one error
for "no room, everything is pinned", whichever tier (resident slots, host memory) says it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from omni_engine.errors import LoRACapacityError

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    def __init__(self, capacity: int, on_evict: Callable[[K, V], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._pinned: set[K] = set()
        self._on_evict = on_evict

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        """Least recently used first."""
        return iter(list(self._entries))

    def get(self, key: K) -> V | None:
        """The value, without changing the order (use `touch` on use)."""
        return self._entries.get(key)

    def touch(self, key: K) -> None:
        self._entries.move_to_end(key)

    def pin(self, key: K) -> None:
        if key not in self._entries:
            raise KeyError(key)
        self._pinned.add(key)

    def unpin(self, key: K) -> None:
        self._pinned.discard(key)

    def is_pinned(self, key: K) -> bool:
        return key in self._pinned

    def has_room_for(self, key: K) -> bool:
        """Whether `put(key, ...)` can succeed: present already, free space, or an unpinned victim."""
        return (
            key in self._entries
            or len(self._entries) < self.capacity
            or any(k not in self._pinned for k in self._entries)
        )

    def put(self, key: K, value: V) -> None:
        """Insert as most recent, evicting least recently used unpinned entries to stay in capacity."""
        if not self.has_room_for(key):
            raise LoRACapacityError(f"all {self.capacity} entries are pinned")
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self.remove_oldest()

    def oldest_unpinned(self) -> K | None:
        """The entry `put` would evict next, without evicting it."""
        return next((key for key in self._entries if key not in self._pinned), None)

    def remove_oldest(self) -> tuple[K, V] | None:
        """Evict the least recently used unpinned entry, telling the owner through on_evict."""
        for key in self._entries:
            if key not in self._pinned:
                value = self._entries.pop(key)
                if self._on_evict is not None:
                    self._on_evict(key, value)
                return key, value
        return None

    def remove(self, key: K) -> V | None:
        """Drop an entry on the owner's request (no on_evict: the owner is already handling it)."""
        self._pinned.discard(key)
        return self._entries.pop(key, None)
