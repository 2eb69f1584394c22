"""What differs between the two brokers omni-batch runs on, in one place.

Redis (`redis://`, `rediss://`): kombu emulates priorities with one list per level and serves the
lowest number first, so a job's priority p (9 = most urgent) travels as `9 - p`. A reserved,
unacked job comes back only after the visibility timeout (`OMNI_VISIBILITY_TIMEOUT`).

RabbitMQ (`amqp://`, `amqps://`): real priorities, the highest number first, on a queue declared
with `x-max-priority`, so a job travels with its own priority. A dead consumer's unacked jobs come
back the moment its connection closes; there is no visibility timeout. Publishes are confirmed (a
job counts as sent once RabbitMQ has it on disk). RabbitMQ closes a channel
that holds a delivery unacked longer than its consumer timeout (30 min by default), and a job may
wait longer than that in a worker's window, so the worker asks for a longer one.

Producer and worker build their Celery apps from `producer.client.celery_config`, which takes
its broker-specific parts from here, so both sides declare the same queue and read the same order.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import amqp.exceptions
import redis.exceptions
from kombu import Exchange, Queue

from producer import defaults as d
from producer.errors import SettingsError
from producer.redact import redact


class BrokerKind(StrEnum):
    REDIS = "redis"
    AMQP = "amqp"


_SCHEMES = {
    "redis": BrokerKind.REDIS,
    "rediss": BrokerKind.REDIS,
    "amqp": BrokerKind.AMQP,
    "amqps": BrokerKind.AMQP,
    "pyamqp": BrokerKind.AMQP,
}

# The broker refused the credentials or the vhost: retrying cannot help (kombu would retry them as
# connection errors).
CREDENTIALS_REFUSED = (
    redis.exceptions.AuthenticationError,
    amqp.exceptions.AccessRefused,
    amqp.exceptions.NotAllowed,  # no such vhost, or no access to it
)

# The consumer timeout a worker asks RabbitMQ for (RabbitMQ >= 3.12 honours it per consumer; an
# older server needs `consumer_timeout` in rabbitmq.conf). A job waits in the window at most
# 2 x the scheduler's max wait (priority 0: 1800 s by default), then runs and is stored.
AMQP_CONSUMER_TIMEOUT_MS = 2 * 3600 * 1000


def broker_kind(url: str) -> BrokerKind:
    """Which broker `url` names; SettingsError for any other scheme."""
    scheme, sep, _ = url.partition("://")
    kind = _SCHEMES.get(scheme.lower()) if sep else None
    if kind is None:
        raise SettingsError(
            f"broker URL {redact(url)!r} is neither Redis nor RabbitMQ: "
            "use redis://host:6379/0 or amqp://user:password@host:5672/vhost"
        )
    return kind


def broker_priority(job_priority: int, kind: BrokerKind) -> int:
    """A job's priority (0..9, 9 = most urgent) in the broker's own order."""
    return d.MAX_PRIORITY - job_priority if kind is BrokerKind.REDIS else job_priority


def broker_settings(kind: BrokerKind) -> dict[str, Any]:
    """The Celery settings that depend on the broker: fresh objects for each app."""
    if kind is BrokerKind.REDIS:
        options = dict(d.BROKER_TRANSPORT_OPTIONS)
        options["priority_steps"] = list(d.BROKER_PRIORITY_STEPS)  # kombu mutates what it is given
        return {"broker_transport_options": options}
    queue = Queue(
        d.QUEUE,
        Exchange(d.QUEUE),
        routing_key=d.QUEUE,
        queue_arguments={"x-max-priority": d.MAX_PRIORITY},
        consumer_arguments={"x-consumer-timeout": AMQP_CONSUMER_TIMEOUT_MS},
    )
    return {
        # A publish returns once RabbitMQ has the message on disk: without confirms, a broker that
        # dies just then drops messages the producer counted as sent.
        "broker_transport_options": {"confirm_publish": True},
        "task_queues": [queue],
        # Queues a worker is told to serve besides `omni` get real priorities too.
        "task_queue_max_priority": d.MAX_PRIORITY,
    }
