"""Which queue a job travels on: its adapter's shard queue while a fleet follows a plan, else `omni`.

The shard is a stable hash of the adapter's name (not Python's `hash`, which changes per process),
so every producer and every worker put one adapter on one shard. Who serves a shard is the
workers' business (`worker.affinity`, `worker.fleet`); a producer only asks whether a plan exists.
Jobs with no adapter, jobs sent while no plan exists, and jobs from clients that do not route
travel on the plain queue, which every worker serves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from hashlib import blake2b

import redis

from producer import defaults as d
from producer.broker import BrokerKind, broker_kind
from producer.errors import SettingsError

logger = logging.getLogger("omni.producer")


def adapter_shard(adapter: str, shards: int = d.SHARDS) -> int:
    """The shard, 0..shards-1, of an adapter name: the same in every process and on every machine."""
    if shards < 1:
        raise SettingsError(f"the number of shards must be >= 1, got {shards!r}")
    return int.from_bytes(blake2b(adapter.encode(), digest_size=8).digest(), "big") % shards


def shard_queue(shard: int) -> str:
    """The queue name of a shard: `omni.a.<shard>`."""
    return f"{d.SHARD_QUEUE_PREFIX}{shard}"


def job_queue(adapter: str | None, *, routed: bool) -> str:
    """The queue of a job naming `adapter`: its shard's while `routed`, else the plain queue."""
    return shard_queue(adapter_shard(adapter)) if routed and adapter else d.QUEUE


def describe_queues(sent_to: Mapping[str, int]) -> str:
    """Where jobs went, for a person: "queue 'omni'", or how many went to adapters' shard queues."""
    plain = f"queue '{d.QUEUE}'"
    routed = {queue: n for queue, n in sent_to.items() if queue != d.QUEUE}
    if not routed:
        return plain
    text = f"{len(routed)} adapter shard queue(s) ({sum(routed.values())} job(s), adapter affinity)"
    return text + (f" and {plain} ({sent_to[d.QUEUE]} job(s))" if sent_to.get(d.QUEUE) else "")


class FleetRoutes:
    """What a producer reads of the fleet: whether a plan exists, in the broker's Redis.

    With RabbitMQ (no affinity) or a Redis that does not answer, nothing is routed: every job
    goes to `omni`, which every worker serves, so routing can only ever move a job, never strand it.
    """

    def __init__(self, broker_url: str) -> None:
        is_redis = broker_kind(broker_url) is BrokerKind.REDIS
        self._redis = redis.Redis.from_url(broker_url, socket_timeout=5) if is_redis else None

    def routing(self) -> bool:
        """Whether jobs with an adapter go to shard queues now (a coordinator's plan is fresh)."""
        if self._redis is None:
            return False
        try:
            return bool(self._redis.exists(d.FLEET_PLAN_KEY))
        except redis.RedisError as e:
            logger.debug("no fleet plan read (%s): jobs go to %r", e, d.QUEUE)
            return False

    def announce(self, queues: Iterable[str]) -> None:
        """Tell the coordinator that shard queues have new jobs, so it plans for them at once."""
        if self._redis is None or not any(q != d.QUEUE for q in queues):
            return
        try:
            self._redis.set(d.FLEET_NEWS_KEY, 1)
        except redis.RedisError as e:  # the next periodic plan finds the jobs anyway
            logger.debug("could not announce new shard jobs: %s", e)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
