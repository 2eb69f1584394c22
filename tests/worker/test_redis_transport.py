"""The worker's Redis transport against a real redis-server: how messages are taken and filed.

The worker process tests (test_faults.py) show what this buys end to end: a frozen or killed
worker loses nothing, a held job is never redelivered. Here each rule is checked on its own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from celery import Celery
from fixtures.redis_server import queued_messages, reserved_restorer
from fixtures.worker_process import wait_for
from kombu import Connection, Consumer, Queue

from producer import defaults as d
from producer.broker import BrokerKind, broker_priority
from producer.client import Client, celery_config
from producer.schema import validate_job
from worker.leases import LeaseKeeper, Liveness
from worker.redis_transport import Transport, priority_list_key

TRANSPORT = f"{Transport.__module__}:{Transport.__name__}"


def _job(prompt: str, **fields) -> dict:
    return validate_job({"prompt": prompt, "dataset": "transport", **fields})


@contextmanager
def _consumer(url: str, *, ack: bool = True) -> Iterator[Callable[[int], list[dict]]]:
    """`take(n)`: n more messages through the worker's transport, one at a time, as dicts."""
    taken: list[dict] = []
    options = celery_config(url)["broker_transport_options"]
    with Connection(url, transport=TRANSPORT, transport_options=options) as connection:
        channel = connection.channel()
        channel.basic_qos(0, 1 if ack else 0, False)

        def on_message(body, message):
            priority, tag = message.properties["priority"], message.delivery_tag
            taken.append({"job": body[0][0], "priority": priority, "tag": tag})
            if ack:
                message.ack()

        def take(count: int) -> list[dict]:
            wanted = len(taken) + count
            for _ in range(count * 20):  # each drain delivers or waits up to 5 s: bounded
                if len(taken) >= wanted:
                    break
                connection.drain_events(timeout=5)
            return taken[wanted - count : wanted]

        with Consumer(channel, [Queue(d.QUEUE)], callbacks=[on_message], accept=["json"]):
            yield take


def _take(url: str, count: int) -> list[dict]:
    with _consumer(url) as take:
        return take(count)


def test_messages_are_taken_most_urgent_first_and_in_order_within_a_priority(redis_url):
    jobs = [_job(f"p{i}", priority=p) for i, p in enumerate([5, 9, 0, 5, 9, 3])]
    with Client(redis_url) as client:
        client.submit_many(jobs)
    taken = [t["job"]["prompt"] for t in _take(redis_url, len(jobs))]
    assert taken == ["p1", "p4", "p0", "p3", "p5", "p2"]


def test_a_taken_message_is_reserved_in_kombus_format_so_kombus_restore_returns_it_intact(
    redis_url, redis_server
):
    with Client(redis_url) as client:
        client.submit(_job("kept", priority=7))
    redis = redis_server.client()
    before = queued_messages(redis, d.QUEUE)
    (raw,) = [json.loads(m) for m in redis.lrange(before[0]["key"], 0, -1)]
    with _consumer(redis_url, ack=False) as take:
        (taken,) = take(1)
        # Held, not acked: in kombu's own record of reserved messages, and in no list.
        assert not queued_messages(redis, d.QUEUE)
        assert redis.zscore("unacked_index", taken["tag"]) is not None
        payload, exchange, routing_key = json.loads(redis.hget("unacked", taken["tag"]))
        # kombu's record: [the message as it was queued, its exchange, its routing key].
        assert payload == raw
        info = raw["properties"]["delivery_info"]
        assert (exchange, routing_key) == (info["exchange"], info["routing_key"])
        # The visibility sweep's restore (kombu's code) while the worker still holds it.
        with reserved_restorer(redis_url) as restore:
            restore(taken["tag"])
    (after,) = queued_messages(redis, d.QUEUE)
    assert after["key"] == priority_list_key(d.QUEUE, broker_priority(7, BrokerKind.REDIS))
    assert after["decoded_body"] == before[0]["decoded_body"] == json.loads(base64.b64decode(payload["body"]))


def test_a_message_sent_without_a_priority_is_served_at_the_default_priority(redis_url, redis_server):
    with Client(redis_url) as client:
        client.submit(_job("default"))
    # Any Celery client: a plain app, no priority given, a job that names none either.
    app = Celery("someone-else", broker=redis_url, set_as_current=False)
    app.send_task(d.TASK_NAME, args=[{"prompt": "raw", "dataset": "transport"}], queue=d.QUEUE)
    app.close()
    queued = {m["decoded_body"][0][0]["prompt"]: m for m in queued_messages(redis_server.client(), d.QUEUE)}
    # kombu files it as broker priority 0: the most urgent list.
    assert queued["raw"]["key"] == priority_list_key(d.QUEUE, 0)
    with Client(redis_url) as client:
        client.submit(_job("urgent", priority=9))

    taken = _take(redis_url, 3)
    assert [t["job"]["prompt"] for t in taken] == ["urgent", "default", "raw"]
    assert taken[2]["priority"] == broker_priority(d.DEFAULT_PRIORITY, BrokerKind.REDIS)
    assert not redis_server.client().hlen("unacked")


def test_an_entry_that_is_no_kombu_message_is_dropped_and_the_rest_are_served(redis_url, redis_server):
    redis = redis_server.client()
    redis.lpush(priority_list_key(d.QUEUE, 0), b"not json at all")
    redis.lpush(priority_list_key(d.QUEUE, 0), json.dumps({"properties": "odd"}))
    with Client(redis_url) as client:
        client.submit(_job("fine"))
    assert [t["job"]["prompt"] for t in _take(redis_url, 1)] == ["fine"]
    assert not queued_messages(redis, d.QUEUE) and not redis.hlen("unacked")


@pytest.fixture
def index(redis_server, redis_url):
    client = redis_server.client()
    client.zadd("unacked_index", {"held": 1.0, "acked": 1.0, "other": 1.0})
    return client


def test_leases_renew_only_what_is_held_and_never_bring_back_what_is_gone(index):
    leases = LeaseKeeper(lambda: index, "unacked_index", timeout_s=60)
    for tag in ("held", "acked", "restored"):
        leases.hold(tag)
    leases.release("acked")
    assert leases.renew(index) == 2
    scores = dict(index.zrange("unacked_index", 0, -1, withscores=True))
    assert scores[b"held"] > 1.0, "a held message's lease is renewed"
    assert scores[b"acked"] == 1.0, "an acked message's is not"
    assert scores[b"other"] == 1.0, "another worker's is not"
    assert b"restored" not in scores, "a message no longer reserved is not reserved again"
    leases.stop()
    assert leases.renew(index) == 0


def test_a_stuck_consumer_s_leases_lapse_and_resume_when_it_works_again(index, caplog):
    consumer = Liveness()
    leases = LeaseKeeper(lambda: index, "unacked_index", timeout_s=60, stuck_after_s=0.05, liveness=consumer)
    leases.hold("held")
    consumer.beat()
    assert leases.renew(index) == 1, "a consumer that just beat keeps its leases"
    index.zadd("unacked_index", {"held": 1.0})

    wait_for(lambda: consumer.stuck(0.05), "the consumer to be silent past the limit")
    assert leases.renew(index) == 0
    assert dict(index.zrange("unacked_index", 0, -1, withscores=True))[b"held"] == 1.0, "left to lapse"
    assert "no longer renewed" in caplog.text, "the operator is told why the jobs go elsewhere"

    consumer.beat()
    assert leases.renew(index) == 1, "a consumer that works again renews them"
    assert dict(index.zrange("unacked_index", 0, -1, withscores=True))[b"held"] > 1.0
    assert not Liveness().stuck(0), "0: never stuck"
