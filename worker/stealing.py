"""Which queue a worker takes from next: its own in an order that finishes one shard before the
next, and, when it has nothing to do, another's (work stealing), so no worker idles while jobs wait.

Pure, as `worker.affinity`: the Redis take passes in its queues' ages (`take_order`), and the
coordinator (`worker.fleet`) what it reads of the queues and of the workers' heartbeats (the steals).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from math import ceil, inf

from worker.affinity import AffinityPolicy


def take_order(
    queues: Iterable[str],
    *,
    last_taken: Mapping[str, float],
    waited: Mapping[str, float],
    policy: AffinityPolicy,
) -> list[str]:
    """The order a worker takes from its queues: those whose oldest job has waited `steal_after_s`
    first, the oldest first; then the one it took from last, then the others it has taken from, the
    most recent first; then those it never took from, in the order given. `waited` is each queue's
    oldest job's age (none: empty), `last_taken` when the worker last took from each.

    Finishing one shard's queue before opening the next keeps a queued dataset to about one load
    per adapter, as one queue in grouped order does; kombu's cycle does the opposite (the queue just
    taken from goes last), and a window refilled a few slots at a time then holds a few jobs of many
    adapters, loaded, evicted and loaded again. The age rule bounds what that order passes over.
    """

    def key(queue: str) -> tuple[bool, float, float]:
        age = waited.get(queue, 0.0)
        overdue = age >= policy.steal_after_s
        return (not overdue, -age if overdue else 0.0, -last_taken.get(queue, -inf))

    return sorted(queues, key=key)


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueState:
    """A shard queue as an idle worker sees it (from Redis and the owners' heartbeats)."""

    name: str
    backlog: int  # jobs in the broker, every priority
    head_age_s: float  # how long its oldest job has been queued
    owners: int  # workers the plan names as its owners
    owners_room: int  # free window slots those owners reported


def steal_target(
    queues: Iterable[QueueState], *, own: Collection[str], policy: AffinityPolicy
) -> QueueState | None:
    """The queue an idle worker takes from, or None: the longest one its owners will not take soon.

    Its owners will not take it soon when it holds more than their windows have room for, or its
    oldest job has waited `policy.steal_after_s` (they are busy). A queue in `own` is never stolen.
    """
    eligible = [
        q
        for q in queues
        if q.name not in own
        and q.backlog > 0
        and (q.backlog > q.owners_room or q.head_age_s >= policy.steal_after_s)
    ]
    return min(eligible, key=lambda q: (-q.backlog, -q.head_age_s, q.name), default=None)


def steal_count(queue: QueueState, room: int) -> int:
    """How many jobs to take: one more owner's share of the backlog, at most the window's room."""
    return min(room, ceil(queue.backlog / (queue.owners + 1)))
