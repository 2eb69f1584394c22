"""Which shard queue an adapter's jobs travel on: the part of adapter affinity a producer must know.

A stable hash of the adapter's name (not Python's `hash`, which changes per process), so every
producer and every worker put one adapter on one shard. Who serves a shard is the workers'
business (`worker.affinity`); jobs with no adapter, and jobs from clients that do not route,
stay on the plain queue, which every worker serves.
"""

from __future__ import annotations

from hashlib import blake2b

from producer import defaults as d
from producer.errors import SettingsError


def adapter_shard(adapter: str, shards: int = d.SHARDS) -> int:
    """The shard, 0..shards-1, of an adapter name: the same in every process and on every machine."""
    if shards < 1:
        raise SettingsError(f"the number of shards must be >= 1, got {shards!r}")
    return int.from_bytes(blake2b(adapter.encode(), digest_size=8).digest(), "big") % shards


def shard_queue(shard: int) -> str:
    """The queue name of a shard: `omni.a.<shard>`."""
    return f"{d.SHARD_QUEUE_PREFIX}{shard}"
