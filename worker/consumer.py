"""The Celery side of grouping: reserved `omni.generate` messages are buffered in a window, and
the pure scheduler decides which group the engine runs next.

Celery hands each message to a task's *strategy*; this one keeps the request instead of running
it. A group runs when the window is full or no job has arrived for `idle_s`. Its results are
stored on a background thread while the next group computes; each message is acked on the
consumer's thread only once its image and sidecar (or its error record) are stored. A job that
fails for good is recorded and acked; one whose storage stayed unreachable, or whose adapter root
could not be reached, is requeued. On a Redis broker the consumer's timer also follows the fleet
(`worker.fleet`): it consumes the shard queues the plan gives this worker and any it is handed a
steal from; with affinity off, only shard queues left with jobs when no plan exists.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from celery.backends.base import DisabledBackend
from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.state import revoked as revoked_tasks
from celery.worker.state import task_ready, task_reserved
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2

from producer import defaults as d
from producer.cli import EXIT_FAILURE
from producer.defaults import DEFAULT_DATASET, SUBMITTED_AT_HEADER
from producer.errors import InvalidStorageKeyError, JobValidationError, StorageError, StorageUnavailableError
from producer.layout import JSON_CONTENT_TYPE, error_key
from producer.records import encode, error_record
from producer.redact import redact_credentials
from producer.schema import validate_job
from worker import metrics
from worker.admission import Admission, to_pending
from worker.attempts import AttemptCounter
from worker.errors import AttemptsUnavailableError, DeviceLostError, PoisonJobError
from worker.execute import Result, failure, generate_group, store_with_retry, take_group
from worker.fleet import FleetMember, app_queues, follow, join_fleet
from worker.keepalive import Keepalive
from worker.leases import CONSUMER
from worker.scheduler import Pending
from worker.settings import WorkerSettings, build_engine

logger = logging.getLogger("omni.worker")

# How often the consumer's timer looks at the window: often, so one group follows another at
# once; whether a group runs is decided by `idle_s`.
TICK_S = 0.05


def grouping_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any):
    """Celery's hook (`Task.Strategy`): called at every (re)connection; the engine loads once."""
    grouping = getattr(app, "omni_consumer", None)
    if grouping is None:
        grouping = app.omni_consumer = GroupingConsumer(app.omni_settings, app, consumer)
    return grouping.attach(task, consumer)


class GroupingConsumer:
    """Holds the window of reserved jobs, runs the groups the scheduler picks, acks what is stored."""

    def __init__(self, settings: WorkerSettings, app: Any, consumer: Any = None) -> None:
        self.settings = settings
        self.app = app
        self.keepalive = Keepalive()
        self.keepalive.use(*_connections(consumer))
        with self.keepalive.busy():  # a large model's load holds the consumer's thread a while
            self.engine = build_engine(settings)
        self.admission = Admission(settings)
        self.attempts = AttemptCounter(settings.broker_url, settings.result_backend)
        self.policy = settings.policy_on(self.engine.device)
        self.window: list[Pending] = []
        # Each upload remembers the connection its messages came on (see `attach`).
        self.uploads: deque[tuple[Future, list[tuple[Any, Result]], int]] = deque()
        self.connection_epoch = 0
        # Every job admitted and not yet settled, with any further deliveries of it.
        self.held: dict[str, list[Any]] = {}
        self.uploader = ThreadPoolExecutor(1, thread_name_prefix="omni-store")
        self.last_arrival = time.monotonic()
        self._timer = None
        self._consumer = consumer
        self.stopping = False  # the device failed: nothing more is admitted or run
        self.fleet: FleetMember | None = None
        self._following: tuple[str, ...] | None = None
        self._operator_queues: frozenset[str] | None = None
        metrics.WINDOW_JOBS.set_function(lambda: len(self.window))
        metrics.WINDOW_CAPACITY.set(settings.window)
        self.summary = metrics.SummaryLog(settings.summary_interval_s)

    # -- Celery wiring -------------------------------------------------------------------------

    def attach(self, task: Any, consumer: Any):
        """A new connection: requests buffered on the old one are Redis's to redeliver."""
        if self._timer is not None:
            self._timer.cancel()
        # Messages of the old connection can no longer be acked; Redis redelivers them, and those
        # stored meanwhile are skipped then, as done.
        self.connection_epoch += 1
        self._consumer = consumer
        self.keepalive.use(*_connections(consumer))
        for pending in self.window:
            task_ready(pending.payload[0])
        self.window.clear()
        self.held.clear()
        self._following = None  # a new task consumer: compare the plan with what it consumes
        if self._operator_queues is None:  # the first connection: what --queues selected
            self._operator_queues = frozenset(app_queues(self.app))
            if self.settings.meets_fleet and d.QUEUE in self._operator_queues:
                self.fleet = join_fleet(self.settings, consumer.hostname)
        app = self.app
        Request = create_request_cls(
            symbol_by_name(task.Request),
            task,
            consumer.pool,
            consumer.hostname,
            consumer.event_dispatcher,
            app=app,
        )

        def decode(message, body, ack, reject):
            # As celery.worker.strategy.default decodes a message, for every protocol version.
            if body is None and "args" not in message.payload:
                body, headers, decoded, utc = message.body, message.headers, False, app.uses_utc_timezone()
            elif "args" in message.payload:
                body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
            else:
                body, headers, decoded, utc = proto1_to_proto2(message, body)
            return Request(
                message,
                on_ack=ack,
                on_reject=reject,
                app=app,
                hostname=consumer.hostname,
                eventer=consumer.event_dispatcher,
                task=task,
                connection_errors=consumer.connection_errors,
                body=body,
                headers=headers,
                decoded=decoded,
                utc=utc,
            )

        def on_message(message, body, ack, reject, callbacks, **kwargs):
            try:
                request = decode(message, body, ack, reject)
            except Exception as e:  # not a task message at all: dropped, or it would kill every worker
                logger.error("dropped a malformed omni.generate message: %s: %s", type(e).__name__, e)
                reject(logger, consumer.connection_errors, False)
                return
            if (request.expires or request.id in revoked_tasks) and request.revoked():
                return  # revoked or expired: Celery acked it and recorded why
            task_reserved(request)
            request.send_event(
                "task-received",
                name=request.name,
                args=request.argsrepr,
                kwargs=request.kwargsrepr,
                root_id=request.root_id,
                parent_id=request.parent_id,
                retries=request.request_dict.get("retries", 0),
                eta=None,
                expires=request.expires and request.expires.isoformat(),
            )
            try:
                self.receive(request)
            except Exception as e:  # one bad message must not take the consumer down
                logger.exception("job %s: unexpected error on receipt", request.id)
                self._fail(request, e)

        self._timer = consumer.timer.call_repeatedly(TICK_S, lambda: self.tick(consumer), priority=10)
        return on_message

    def close(self) -> None:
        """At the worker's shutdown: leave the fleet at once (its shards go to others without waiting
        for the heartbeat to expire) and stop the side threads. Jobs still held go back to the queue
        with the connection, as at any stop."""
        try:
            if self.fleet is not None:
                self.fleet.stop()
        finally:
            self.keepalive.close()

    # -- the window ----------------------------------------------------------------------------

    def receive(self, request: Any) -> None:
        if self.stopping:
            _put_back([request])
            return
        self.last_arrival = time.monotonic()
        pending = self._admit(request)
        if pending is not None:
            self.window.append(pending)
        self.harvest()
        if len(self.window) >= self.settings.window:
            self.run_next()

    def tick(self, consumer: Any) -> None:
        """On the consumer's timer: settle finished uploads; run a group once arrivals pause;
        follow the fleet's plan."""
        CONSUMER.beat()
        try:
            self.harvest()
            if self.window and time.monotonic() - self.last_arrival >= self.settings.idle_s:
                self.run_next()
            self.summary.maybe_log(len(self.window), self.settings.window)
            if self.fleet is not None:
                self.fleet.ran((), holding=len(self.window))
                queues = self.fleet.queues
                if queues != self._following and follow(consumer, queues, keep=self._operator_queues):
                    self._following = queues
        except Exception:  # the timer must keep running whatever one group did
            logger.exception("omni-batch worker: unexpected error between groups")

    def _admit(self, request: Any) -> Pending | None:
        raw = request.args[0] if len(request.args) == 1 and not request.kwargs else None
        try:
            if raw is None:
                raise JobValidationError(["a job is one JSON object, the task's only argument"])
            job = validate_job(raw)
            storage = self.admission.storage_for(job)
        except (JobValidationError, StorageError) as e:
            self._reject_invalid(request, raw, e)
            return None
        if job.job_id in self.held:
            # Delivered again while held (the visibility timeout passed, or it was sent twice): this
            # delivery is settled with the first, never before, or a crash meanwhile would lose both.
            self.held[job.job_id].append(request)
            logger.debug("job %s delivered again while held", job.job_id)
            return None
        submitted_at = request.message.headers.get(SUBMITTED_AT_HEADER)
        try:
            with self.keepalive.busy():  # an adapter may be fetched from object storage
                admitted = self.admission.admit(
                    job, storage, submitted_at=submitted_at if isinstance(submitted_at, float) else None
                )
        except StorageUnavailableError as e:  # an adapter root out of reach: not the job's fault
            logger.error("job %s: adapter storage unreachable, back to the queue: %s", request.id, e)
            metrics.JOBS_REQUEUED.labels(type(e).__name__).inc()
            _put_back([request])
            return None
        except StorageError as e:  # no such bucket, access denied: nothing to retry
            self._fail(request, e)
            return None
        if admitted is None:
            metrics.JOBS_SKIPPED.inc()
            self._succeed(request, "skipped: its outputs exist")  # a redelivery, or sent again
            return None
        self.held[job.job_id] = []
        if self.fleet is not None:
            self.fleet.taken(job.adapter)
        if isinstance(admitted, Result):
            self._store([(request, admitted)])
            return None
        return to_pending(admitted, payload=(request, admitted))

    def run_next(self) -> None:
        if self.stopping:
            return
        CONSUMER.beat()  # a long group is work, not silence: it starts the count afresh
        group = take_group(self.engine, self.window, lambda pending: pending.payload[1], policy=self.policy)
        live = []
        for p in group:
            if p.payload[0].revoked():  # revoked meanwhile: Celery acked it; settle its other deliveries
                for extra in self.held.pop(p.job_id, []):
                    self._finish(extra)
            else:
                live.append(p)
        try:
            previous = self.attempts.previous(p.job_id for p in live)
        except AttemptsUnavailableError as e:
            self._requeue(live, e)
            return
        runnable = []
        for p in live:
            if previous[p.job_id] >= self.settings.max_attempts:
                error = PoisonJobError(
                    f"started {previous[p.job_id]} times without finishing (the worker died, or the "
                    "outputs could not be stored, each time); it is not run again"
                )
                self._store([(p.payload[0], failure(p.payload[1], error))])
            else:
                runnable.append(p)
        if not runnable:
            return
        # A job started before and never finished runs alone: it cannot take a batch down with it.
        # Nor can it take a job stored in the background: it runs with no other outcome in flight.
        retried = any(previous[p.job_id] for p in runnable)
        batches = [[p] for p in runnable] if retried else [runnable]
        for i, batch in enumerate(batches):
            if self.stopping:  # the device failed: the rest went back to the queue
                return
            if retried:
                self.settle()
            try:
                self.attempts.start(p.job_id for p in batch)
            except AttemptsUnavailableError as e:
                self._requeue([p for rest in batches[i:] for p in rest], e)
                return
            try:
                self._generate(batch)
            except DeviceLostError as e:
                self._stop_for_device([p for rest in batches[i:] for p in rest], e)
        if retried:
            self.settle()

    def _generate(self, batch: list[Pending]) -> None:
        items = [p.payload[1] for p in batch]
        started = time.monotonic()
        for p in batch:  # Celery's active state and a task-started event, as its pool would do
            p.payload[0].on_accepted(os.getpid(), started)
        logger.debug(
            "running %d job(s) for %s; %d left in the window", len(items), batch[0].adapter, len(self.window)
        )
        try:
            with self.keepalive.busy():
                results = generate_group(self.engine, items)
        except DeviceLostError:
            raise  # not the jobs' fault: `run_next` puts them back and stops the worker
        except Exception as e:  # not the job's own error: record it and keep serving
            logger.exception("omni-batch worker: a group of %d job(s) failed", len(items))
            results = [failure(item, e) for item in items]
        if self.fleet is not None:
            self.fleet.ran((item.job.adapter for item in items), holding=len(self.window))
        self._store([(p.payload[0], result) for p, result in zip(batch, results, strict=True)])

    # -- storing and acking --------------------------------------------------------------------

    def _store(self, pairs: list[tuple[Any, Result]]) -> None:
        results = [result for _, result in pairs]
        self.uploads.append((self.uploader.submit(self._store_all, results), pairs, self.connection_epoch))

    def _store_all(self, results: list[Result]) -> list[StorageError | None]:
        attempts, backoff = self.settings.store_attempts, self.settings.store_backoff_s
        return [store_with_retry(result, attempts=attempts, backoff_s=backoff) for result in results]

    def settle(self) -> None:
        """Wait until every outcome in flight is stored and acked. Around a job that may kill the
        worker: else a job whose outcome was still being stored would be counted as crashed with
        it, and failed as poison once that count reached the bound."""
        with self.keepalive.busy():  # stores waiting out an unreachable storage take a while
            wait([future for future, _, _ in self.uploads])
        self.harvest()

    def harvest(self) -> None:
        """Ack what is stored, in order; on the consumer's thread, where the channel lives."""
        while self.uploads and self.uploads[0][0].done():
            future, pairs, epoch = self.uploads.popleft()
            settled = []
            for (request, result), error in zip(pairs, future.result(), strict=True):
                job_id = result.item.job.job_id
                if epoch != self.connection_epoch:
                    # Delivered on a connection that is gone: Redis redelivers; stored ones are skipped.
                    task_ready(request)
                    if error is None:
                        settled.append(job_id)
                    continue
                deliveries = [request, *self.held.pop(job_id, [])]
                if isinstance(error, StorageUnavailableError):
                    # Its start stays counted: a job the storage never takes is bounded too.
                    logger.error("job %s: storage unreachable, back to the queue: %s", request.id, error)
                    metrics.JOBS_REQUEUED.labels(type(error).__name__).inc()
                    _put_back(deliveries)
                    continue
                if error is None and result.ok:
                    metrics.JOBS_DONE.inc()
                    self._succeed(request, "stored")
                else:
                    self._fail(request, error or result.error)
                for extra in deliveries[1:]:
                    self._finish(extra)
                settled.append(job_id)
            self.attempts.finished(settled)

    def _stop_for_device(self, unrun: list[Pending], error: DeviceLostError) -> None:
        """The device is unusable to this process: every job held goes back to the queue, neither
        run nor failed; outcomes already made are stored; then the worker stops with exit code 1,
        for its supervisor to start a fresh one. A job that breaks the device each time it runs is
        failed as poison after `OMNI_MAX_ATTEMPTS` starts, as for any job that kills its worker."""
        logger.critical("omni-batch worker: %s; stopping, every job held goes back to the queue", error)
        self.stopping = True
        self._requeue([*unrun, *self.window], error)
        self.window.clear()
        self.settle()
        # Celery sends acks and rejects from its event loop, at its next turn: the stop is asked for
        # after them, so they go out first. Its warm stop then returns anything else still held.
        self._consumer.call_soon(_stop_worker)

    def _requeue(self, group: list[Pending], error: Exception) -> None:
        """Back to the queue, not run: without the start counts a poison job could kill every worker;
        on a failed device, it would fail every job."""
        logger.error("%d job(s) back to the queue, not run: %s", len(group), error)
        metrics.JOBS_REQUEUED.labels(type(error).__name__).inc(len(group))
        for p in group:
            _put_back([p.payload[0], *self.held.pop(p.job_id, [])])

    def _succeed(self, request: Any, outcome: str) -> None:
        """Done (or done already): the task-succeeded event monitors such as Flower wait for, then the ack."""
        runtime = time.time() - request.time_start if request.time_start else 0.0
        request.send_event("task-succeeded", result=outcome, runtime=runtime)
        self._finish(request)

    def _finish(self, request: Any) -> None:
        request.acknowledge()
        task_ready(request)

    def _fail(self, request: Any, error: BaseException) -> None:
        """A failure for good: Celery's FAILURE state (when results are kept), then the ack."""
        logger.warning("job %s failed: %s: %s", request.id, type(error).__name__, error)
        metrics.JOBS_FAILED.labels(type(error).__name__).inc()
        request.send_event("task-failed", exception=f"{type(error).__name__}: {error}", traceback="")
        if not isinstance(self.app.backend, DisabledBackend):
            try:
                self.app.backend.mark_as_failure(request.id, error, request=request._context)
            except Exception:
                logger.exception("job %s: could not record the failure in the result backend", request.id)
        self._finish(request)

    def _reject_invalid(self, request: Any, raw: Any, error: Exception) -> None:
        """A message that is no valid job: recorded under the worker's own output, never the job's."""
        data = redact_credentials(raw) if isinstance(raw, dict) else {}
        try:
            key = error_key(str(data.get("dataset", DEFAULT_DATASET)), str(data.get("job_id", request.id)))
        except InvalidStorageKeyError:
            key = None
        if key is not None and self.settings.output_uri is not None:
            try:
                storage = self.admission.storages.for_uri(self.settings.output_uri)
                storage.put_bytes(key, encode(error_record(data, error)), content_type=JSON_CONTENT_TYPE)
            except StorageError as e:
                logger.error("job %s: could not write its error record: %s", request.id, e)
        self._fail(request, error)


def _connections(consumer: Any) -> tuple[Any, ...]:
    """A Celery consumer's broker connections: its own, and its task events' when it sends them."""
    if consumer is None:
        return ()
    return (consumer.connection, getattr(consumer.event_dispatcher, "connection", None))


def _stop_worker() -> None:
    """Celery's own warm stop, with exit code 1 (its event loop checks this flag every turn)."""
    worker_state.should_stop = EXIT_FAILURE


def _put_back(deliveries: list[Any]) -> None:
    """Return messages to the queue unsettled, for any worker to take again."""
    for delivery in deliveries:
        delivery.reject(requeue=True)
        task_ready(delivery)
