"""kombu's Redis transport, with one fix so a worker survives Redis itself dying.

When Redis goes away while the worker holds reserved jobs, Celery closes the channel, and kombu
(5.7) tries to put those jobs back through a connection that no longer exists: an AttributeError
that Celery does not expect, and the worker process dies. Here that failed restore is logged
instead; the jobs are still in Redis's own `unacked` record and come back with the visibility
timeout, so nothing is lost and the worker reconnects as it should.
"""

from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis

logger = logging.getLogger("omni.worker")


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client=None):
        try:
            return super().restore_unacked(client)
        except (AttributeError, *self.channel.connection_errors) as e:
            logger.warning(
                "could not return %d reserved job(s) to the queue (%s: %s); "
                "Redis redelivers them after the visibility timeout",
                len(self._delivered),
                type(e).__name__,
                e,
            )
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
