"""What Flower sees: Celery's task events, captured from a real redis-server the way Flower captures
them (an event receiver), while a real `omni-batch worker` process runs jobs submitted by the
producer's client. Nothing is mocked."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import pytest
from celery import Celery
from fixtures.worker_process import ADAPTERS, DONE_TIMEOUT_S, POLL_S, assert_alive, wait_settled, worker_flags

from producer.client import Client, celery_config
from producer.schema import validate_job
from producer.storage import open_storage

DATASET = "flower"
HOSTNAME = "omni@events-test"


class EventLog:
    """Every event on the broker's event exchange, in arrival order, from a background receiver."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery("flower-like", set_as_current=False)
        self.app.conf.update(celery_config(broker_url))
        self.events: list[dict] = []
        self.receiver = None
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self.events.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def wait_for(self, what: str, condition) -> None:
        deadline = time.monotonic() + DONE_TIMEOUT_S
        while not condition(list(self.events)):
            assert time.monotonic() < deadline, f"never saw {what}; events: {self.events[-20:]}"
            time.sleep(POLL_S)  # polling a condition with a deadline

    def by_task(self) -> dict[str, list[str]]:
        types = defaultdict(list)
        for event in list(self.events):
            if event["type"].startswith("task-"):
                types[event["uuid"]].append(event["type"])
        return types

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self._thread.join(30)
        self.app.close()


@pytest.fixture
def event_log(redis_url) -> Iterator[EventLog]:
    log = EventLog(redis_url)
    yield log
    log.stop()


def test_flower_sees_the_worker_and_every_job_from_sent_to_settled(
    redis_url, s3_bucket, six_adapters, start_worker, event_log
):
    worker = start_worker(*worker_flags(redis_url, six_adapters, s3_bucket.uri), "--hostname", HOSTNAME)
    # The worker's heartbeat is what lists it in Flower; seeing it also shows the receiver is live.
    event_log.wait_for(
        "a heartbeat",
        lambda events: any(e["type"] == "worker-heartbeat" and e["hostname"] == HOSTNAME for e in events),
    )
    good = [
        validate_job({"prompt": f"seen {i}", "adapter": ADAPTERS[i % 2], "dataset": DATASET})
        for i in range(4)
    ]
    unknown = validate_job({"prompt": "who?", "adapter": "no-such-style", "dataset": DATASET})
    with Client(redis_url) as client:
        client.submit_many([*good, unknown])
    wait_settled(open_storage(s3_bucket.uri), DATASET, [j.job_id for j in [*good, unknown]], worker=worker)

    def settled(events) -> bool:
        ends = {e["uuid"] for e in events if e["type"] in ("task-succeeded", "task-failed")}
        return ends >= {j.job_id for j in [*good, unknown]}

    event_log.wait_for("every job settled", settled)
    assert_alive(worker)
    # task-sent comes from the producer, the rest from the worker, in the order it sends them.
    by_task = event_log.by_task()
    assert {uuid for uuid, types in by_task.items() if "task-sent" in types} == {
        j.job_id for j in [*good, unknown]
    }
    types = {uuid: [t for t in types if t != "task-sent"] for uuid, types in by_task.items()}
    for job in good:
        assert types[job.job_id] == ["task-received", "task-started", "task-succeeded"], job.job_id
    # Refused on receipt (its adapter is unknown): never started, failed with the reason.
    assert types[unknown.job_id] == ["task-received", "task-failed"]
    [failed] = [e for e in event_log.events if e["type"] == "task-failed"]
    assert "no-such-style" in failed["exception"] and failed["hostname"] == HOSTNAME
    [received] = [e for e in event_log.events if e["type"] == "task-received" and e["uuid"] == good[0].job_id]
    assert received["name"] == "omni.generate" and received["hostname"] == HOSTNAME


def test_task_events_can_be_turned_off(
    redis_url, s3_bucket, six_adapters, start_worker, event_log, monkeypatch
):
    monkeypatch.setenv("OMNI_TASK_EVENTS", "off")
    worker = start_worker(*worker_flags(redis_url, six_adapters, s3_bucket.uri), "--hostname", HOSTNAME)
    job = validate_job({"prompt": "unseen", "dataset": DATASET})
    with Client(redis_url) as client:
        client.submit(job)
    wait_settled(open_storage(s3_bucket.uri), DATASET, [job.job_id], worker=worker)
    settled_at = time.time()
    # Heartbeats still flow (Flower lists the worker); one sent after the job shows the worker's
    # events were flushed meanwhile, and no task event was sent by either side.
    event_log.wait_for(
        "a heartbeat after the job",
        lambda events: any(
            e["type"] == "worker-heartbeat" and e["hostname"] == HOSTNAME and e["timestamp"] > settled_at
            for e in events
        ),
    )
    assert not [e for e in event_log.events if e["type"].startswith("task-")]
