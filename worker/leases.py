"""Leases: a live worker keeps renewing every message it holds, so the visibility timeout can be short.

kombu's Redis transport records a reserved message in `unacked` and its time in `unacked_index`;
any worker's sweep puts a message back in the queue once that time is `visibility_timeout` old.
Renewing the time of every held message (as Pub/Sub's clients extend ack deadlines, or SQS's
ChangeMessageVisibility) means a message comes back only when its worker has stopped renewing:
it died, or lost its connection and dropped its window. The renewals run on a thread of their
own, with their own Redis connection, so they go on while a long generation holds the consumer.

That thread would also go on renewing for a consumer that is stuck (a deadlock, a hung device or
socket), and hold its window's jobs for good. So the consumer beats `CONSUMER` (at every tick of
its timer and before every group); once it has been silent for `stuck_after_s`, renewals stop,
said once in the log, and other workers take its jobs after the visibility timeout. They resume
if it beats again (its jobs may then run twice: outputs are idempotent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

logger = logging.getLogger("omni.worker")

# Renewals per visibility timeout: a lease is renewed when a fifth of it has passed, so a renewal
# may be late by most of the timeout before the message is at risk.
RENEWALS_PER_TIMEOUT = 5


class Liveness:
    """When the worker's consumer last showed it was working (monotonic clock)."""

    def __init__(self) -> None:
        self._at = time.monotonic()

    def beat(self) -> None:
        self._at = time.monotonic()

    def stuck(self, after_s: float) -> bool:
        """Silent for `after_s` seconds (never, when `after_s` is 0)."""
        return after_s > 0 and time.monotonic() - self._at > after_s


# The process's one consumer (a worker runs one per process).
CONSUMER = Liveness()


class LeaseKeeper:
    """Renews the score of each held member of a sorted set (kombu's `unacked_index`) to now."""

    def __init__(
        self,
        connect: Callable[[], redis.Redis],
        index_key: str,
        *,
        timeout_s: float,
        stuck_after_s: float = 0,
        liveness: Liveness = CONSUMER,
    ) -> None:
        self._connect = connect
        self._index_key = index_key
        self.interval_s = timeout_s / RENEWALS_PER_TIMEOUT
        self.stuck_after_s = stuck_after_s
        self._liveness = liveness
        self._stuck = False
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def hold(self, tag: str) -> None:
        """Keep renewing `tag` from now on (its first lease was written when it was taken)."""
        with self._lock:
            self._held.add(tag)
            if self._thread is None and not self._stopped.is_set():
                self._thread = threading.Thread(target=self._run, name="omni-leases", daemon=True)
                self._thread.start()

    def release(self, tag: str) -> None:
        """Stop renewing `tag`: it is acked, rejected or back in the queue."""
        with self._lock:
            self._held.discard(tag)

    def release_all(self) -> None:
        with self._lock:
            self._held.clear()

    def held(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._held)

    def stop(self) -> None:
        """Stop renewing anything; the thread ends within one interval."""
        self.release_all()
        self._stopped.set()

    def renew(self, client: redis.Redis) -> int:
        """Set every held lease to now, unless the consumer is stuck. `XX`: a tag acked or restored
        meanwhile is not written back."""
        tags = self.held()
        if self._liveness.stuck(self.stuck_after_s):
            if tags and not self._stuck:
                logger.error(
                    "the consumer has done nothing for %g s: the leases of its %d held job(s) are no "
                    "longer renewed, so other workers take them after the visibility timeout",
                    self.stuck_after_s, len(tags),
                )  # fmt: skip
            self._stuck = True
            return 0
        if self._stuck:
            logger.warning("the consumer is working again: job leases renewed")
            self._stuck = False
        if not tags:
            return 0
        now = time.time()
        client.zadd(self._index_key, dict.fromkeys(tags, now), xx=True)
        return len(tags)

    def _run(self) -> None:
        client = self._connect()
        try:
            while not self._stopped.wait(self.interval_s):
                try:
                    self.renew(client)
                except redis.RedisError as e:
                    # Held messages may come back to the queue after the timeout: they will be
                    # run twice (outputs are idempotent), never lost. Said once per outage.
                    if not self._failing:
                        logger.warning("cannot renew job leases (%s: %s); retrying", type(e).__name__, e)
                    self._failing = True
                else:
                    if self._failing:
                        logger.warning("job leases renewed again")
                    self._failing = False
        finally:
            client.close()
