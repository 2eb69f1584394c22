"""A busy worker's RabbitMQ connections: heartbeats sent from a side thread while the consumer's
thread cannot, against the machine's RabbitMQ (a vhost of the test's own)."""

from __future__ import annotations

import threading
import time

import kombu
import pytest

from worker.keepalive import Keepalive

HEARTBEAT_S = 1  # time compressed: the shipped timeout is 60 s


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_busy_spells_back_to_back_keep_the_connection_and_py_amqp_s_own_check_quiet(broker):
    # Busy for four timeouts in spells shorter than one heartbeat interval, the event loop's check
    # never run between them: what a window of retried jobs, run one by one, does to the consumer.
    keepalive = Keepalive()
    with kombu.Connection(broker.url, heartbeat=HEARTBEAT_S) as connection:
        connection.connect()
        keepalive.use(connection)
        connection.heartbeat_check()  # Celery's timer, before the busy spells
        until = time.monotonic() + 4 * HEARTBEAT_S
        while time.monotonic() < until:
            with keepalive.busy():
                time.sleep(HEARTBEAT_S / 5)  # stands for a call that holds the thread, not a wait
        # What Celery's timer runs first once the thread is back: it must not take the server for dead.
        connection.heartbeat_check()
        # And the server has not taken the client for dead: the connection still carries messages.
        with connection.SimpleQueue("keepalive") as queue:
            queue.put({"alive": True})
            assert queue.get(timeout=10).payload == {"alive": True}
    keepalive.close()


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_close_stops_the_side_thread_and_later_busy_spells_start_none(broker):
    # The worker's shutdown closes it: no thread is left writing heartbeats on a closing connection.
    keepalive = Keepalive()
    before = set(threading.enumerate())
    with kombu.Connection(broker.url, heartbeat=HEARTBEAT_S) as connection:
        connection.connect()
        keepalive.use(connection)
        with keepalive.busy():
            beating = [t for t in set(threading.enumerate()) - before if t.name == "omni-keepalive"]
        assert len(beating) == 1
        keepalive.close()
        assert not beating[0].is_alive()
        keepalive.use(connection)  # a reconnection during shutdown
        with keepalive.busy():
            assert set(threading.enumerate()) <= before
