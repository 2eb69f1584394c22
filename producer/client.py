"""Enqueue jobs as Celery tasks, by name, without importing the worker or torch.

`celery_config` is the one place the broker settings live: the worker builds its app from the
same dict, so both sides agree on serialisation, queue and priority order (`producer.broker`
holds what differs between Redis and RabbitMQ).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import kombu.exceptions
from celery import Celery
from kombu.exceptions import OperationalError

from producer import defaults as d
from producer.broker import broker_kind, broker_priority, broker_settings
from producer.errors import BrokerUnavailableError
from producer.redact import redact
from producer.routing import FleetRoutes, job_queue
from producer.schema import Job
from producer.settings import read_environment

# Messages buffered per Redis round trip; progress is reported after each.
PUBLISH_CHUNK = 500
# kombu >= 5.7 raises this when a pipelined batch fails (some of it may have been delivered).
_BatchPublishError = getattr(kombu.exceptions, "BatchPublishError", OperationalError)
# Reaching the broker before sending anything: one try and two quick retries (0.1 s, 0.3 s).
CONNECT_RETRIES = 2


def celery_config(
    broker_url: str, result_backend: str | None = None, *, task_events: bool = True
) -> dict[str, Any]:
    """Celery settings both the producer and the worker use: JSON only, ten priority levels.

    `task_events` (`OMNI_TASK_EVENTS`): the task-sent event of each job submitted and the
    worker's received, started, succeeded and failed events, for Flower or `celery events`.
    SettingsError if `broker_url` is neither Redis nor RabbitMQ.
    """
    return {
        **broker_settings(broker_kind(broker_url)),
        "broker_url": broker_url,
        "result_backend": result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": d.QUEUE,
        "task_send_sent_event": task_events,
        "worker_send_task_events": task_events,
    }


def _publish_batch(producer: Any) -> contextlib.AbstractContextManager[Any]:
    # kombu >= 5.7 pipelines the messages of a batch into one round trip; older kombu sends
    # each at once, which is slower but the same.
    batch = getattr(producer, "batch", None)
    return batch(max_size=PUBLISH_CHUNK * 2) if batch is not None else contextlib.nullcontext()


def grouped_order(jobs: Sequence[Job]) -> list[Job]:
    """The jobs of one adapter next to each other, those of one batch key (`Job.batch_key`) together
    among them, within each priority (most urgent first); each run where its first job was.

    A whole dataset queued in this order is drained by a worker with about one adapter load per
    adapter, where the order of a file would have it meet every adapter in every window.
    """
    runs = [(job.priority, job.adapter, job.batch_key()) for job in jobs]
    first: dict[tuple[object, ...], int] = {}  # where each (priority, adapter) and its batch key begin
    for index, run in enumerate(runs):
        first.setdefault(run[:2], index)
        first.setdefault(run, index)
    order = sorted(range(len(jobs)), key=lambda i: (-runs[i][0], first[runs[i][:2]], first[runs[i]]))
    return [jobs[i] for i in order]


class Client:
    """Sends jobs to the `omni` queue, or while a fleet follows a plan each job with an adapter to
    its adapter's shard queue (`producer.routing`). Fire and forget: results are read from
    storage, not Celery."""

    def __init__(self, broker_url: str | None = None) -> None:
        env = read_environment()
        self.broker_url = broker_url or env.broker_url
        self.safe_broker_url = redact(self.broker_url)
        self.broker_kind = broker_kind(self.broker_url)
        self.app = Celery("omni-producer", set_as_current=False)
        self.app.conf.update(celery_config(self.broker_url, task_events=env.task_events))
        with self.app.connection_for_write() as connection:  # builds the transport, connects nothing
            # The transport's own connection errors (redis-py's for Redis) escape a publish as they are.
            self._broker_errors = (OperationalError, _BatchPublishError, *connection.connection_errors)
        self.routes = FleetRoutes(self.broker_url)
        # Where the last `submit_many` sent its jobs: queue -> jobs (for what a CLI or beat reports).
        self.sent_to: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"Client({self.safe_broker_url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled broker connections."""
        self.routes.close()
        self.app.close()

    def submit(self, job: Job) -> str:
        """Enqueue one job; returns its job_id (also the Celery task id)."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: Iterable[Job], *, progress: Callable[[int], None] | None = None) -> list[str]:
        """Enqueue jobs over one connection, in pipelined chunks; returns their job_ids in order.

        The jobs are sent in `grouped_order`, so that a worker's window meets long runs of one
        adapter. `progress(n)` is called after each chunk reaches the broker. Raises
        BrokerUnavailableError, saying how many jobs were sent, if the broker cannot be reached or
        drops mid-way.
        """
        jobs = list(jobs)
        self.sent_to = Counter()
        chunks = self._publish(grouped_order(jobs))
        sent, connected = 0, False
        while True:
            # Only the broker's own errors become BrokerUnavailableError, not the callback's.
            try:
                taken = next(chunks, None)
            except self._broker_errors as e:
                in_flight = min(PUBLISH_CHUNK, len(jobs) - sent) if connected else 0
                reasons = dict.fromkeys(str(x) or type(x).__name__ for x in (e, e.__cause__) if x is not None)
                reason = "; ".join(reasons).replace(self.broker_url, self.safe_broker_url)
                raise BrokerUnavailableError(
                    self.safe_broker_url, reason, sent=sent, uncertain=in_flight, total=len(jobs)
                ) from e
            if taken is None:
                return [job.job_id for job in jobs]
            connected = True
            sent += taken
            if taken and progress is not None:
                progress(taken)

    def _publish(self, jobs: list[Job]) -> Iterator[int]:
        """Yields 0 once connected, then the size of each chunk as the broker takes it."""
        with self.app.producer_or_acquire() as producer:
            # Fail before the first message rather than part-way through the batch.
            producer.connection.ensure_connection(
                max_retries=CONNECT_RETRIES, interval_start=0.1, interval_step=0.2
            )
            routed = self.routes.routing()
            # Each queue declared once here, not re-checked per message (`declare=[]` in _send).
            declared: set[str] = set()
            yield 0
            for start in range(0, len(jobs), PUBLISH_CHUNK):
                chunk = jobs[start : start + PUBLISH_CHUNK]
                queues = [job_queue(job.adapter, routed=routed) for job in chunk]
                for queue in dict.fromkeys(queues).keys() - declared:
                    producer.maybe_declare(self.app.amqp.queues[queue])
                    declared.add(queue)
                with _publish_batch(producer):
                    for job, queue in zip(chunk, queues, strict=True):
                        self._send(producer, job, queue)
                self.routes.announce(queues)
                self.sent_to.update(queues)
                yield len(chunk)

    def _send(self, producer: Any, job: Job, queue: str) -> None:
        self.app.send_task(
            d.TASK_NAME,
            args=[job.wire_dict()],
            task_id=job.job_id,
            queue=queue,
            priority=broker_priority(job.priority, self.broker_kind),
            headers={d.SUBMITTED_AT_HEADER: time.time()},
            # Celery would repr the whole job for logs and monitors, half the cost of a send.
            argsrepr=f"[<job {job.job_id} dataset={job.dataset} adapter={job.adapter}>]",
            kwargsrepr="{}",
            declare=[],
            ignore_result=True,
            producer=producer,
        )
