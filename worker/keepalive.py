"""AMQP heartbeats while the consumer's thread is busy.

Celery sends and checks RabbitMQ's heartbeats from the consumer's event loop, on two connections
(the consumer's and the task events'), and a group runs on that thread. A call longer than the
heartbeat timeout (a large model's batch, a model load) made RabbitMQ close a connection, and
Celery then reconnected and RabbitMQ requeued every job the worker held, for other workers to run
again. While the thread is busy with work that does not touch those connections, a side thread
sends the heartbeats instead: only inside `busy()`, under a lock that `busy()` takes again before
it returns. (Celery's shutdown signal handlers may write meanwhile; py-amqp serialises frame
writes.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic
from typing import Any

logger = logging.getLogger("omni.worker")

# Heartbeats sent per heartbeat timeout while busy (RabbitMQ closes a connection after about two
# intervals of timeout / 2 with nothing received).
BEATS_PER_TIMEOUT = 4
# How long a shutdown waits for the side thread (stuck writing to a dead socket, it is let go).
CLOSE_TIMEOUT_S = 5.0


class Keepalive:
    """Keeps a worker's AMQP connections alive while it is busy; does nothing on Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._connections: tuple[Any, ...] = ()  # kombu Connections that speak heartbeats
        self._beating: list[Any] = []  # their py-amqp connections, while busy
        self._idle = True
        self._closed = False
        self._thread: threading.Thread | None = None

    def use(self, *connections: Any) -> None:
        """The kombu Connections to keep alive from now on (None and Redis's are left out)."""
        with self._lock:
            self._connections = tuple(c for c in connections if c is not None and c.supports_heartbeats)

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Around work that keeps the consumer's thread away from its connections."""
        with self._lock:
            # Only connections already open: reading `.connection` of a closed one would open it.
            opened = [c.connection for c in self._connections if c.connected]
            self._beating = [amqp for amqp in opened if amqp.heartbeat]
            if self._beating and not self._closed:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="omni-keepalive", daemon=True)
                    self._thread.start()
                elif self._idle:
                    self._wake.notify()
        try:
            yield
        finally:
            with self._lock:
                beating, self._beating = self._beating, []
                for amqp in beating:
                    # Nothing was read while busy (nor between busy spells run back to back): py-amqp's
                    # own check, due before the next read, would take the server's heartbeats waiting
                    # unread for missed ones. Once it is late, it starts counting afresh.
                    if monotonic() - amqp.last_heartbeat_received > amqp.heartbeat:
                        amqp.prev_recv = None

    def close(self) -> None:
        """Stop the side thread (at the worker's shutdown); `busy()` sends nothing afterwards."""
        with self._lock:
            self._closed = True
            self._connections, self._beating = (), []
            self._wake.notify()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=CLOSE_TIMEOUT_S)

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                if not self._beating:
                    self._idle = True
                    self._wake.wait()
                    self._idle = False
                    continue
                self._wake.wait(min(amqp.heartbeat for amqp in self._beating) / BEATS_PER_TIMEOUT)
                for amqp in self._beating:
                    try:
                        amqp.send_heartbeat()
                    except Exception as e:  # the event loop finds the broken connection when it is back
                        logger.debug("keepalive: could not send a heartbeat: %s", e)
