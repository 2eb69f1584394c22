"""The Celery app of a worker: the producer's wire settings plus what makes delivery safe.

Late acks (a job is acked only once its outputs are stored), a reservation of `window` jobs for
grouping, the solo pool (CUDA and fork do not mix; one process per GPU), and on Redis a visibility
timeout above the longest a job can wait in the window (RabbitMQ returns a dead worker's jobs when
its connection closes, and is asked for a consumer timeout that long: `producer.broker`).
"""

from __future__ import annotations

from celery import Celery, Task

from producer import defaults as d
from producer.broker import CREDENTIALS_REFUSED, BrokerKind, broker_kind
from producer.client import celery_config
from worker.redis_transport import STUCK_AFTER_OPTION
from worker.settings import WorkerSettings

# Seconds a warm shutdown lets a running group finish before buffered jobs go back to the queue.
SOFT_SHUTDOWN_TIMEOUT_S = 60.0


class GenerateTask(Task):
    """`omni.generate`: jobs are buffered and grouped by `worker.consumer`, not run one by one."""

    name = d.TASK_NAME
    Strategy = "worker.consumer:grouping_strategy"
    acks_late = True
    reject_on_worker_lost = True

    def run(self, job: dict) -> None:
        raise RuntimeError(
            "omni.generate runs through the grouping worker (omni-batch worker), not as a plain call"
        )


def make_app(settings: WorkerSettings) -> Celery:
    app = Celery("omni-worker", set_as_current=False)
    config = celery_config(settings.broker_url, settings.result_backend, task_events=settings.task_events)
    if broker_kind(settings.broker_url) is BrokerKind.REDIS:  # RabbitMQ has no visibility timeout
        transport = config["broker_transport_options"]
        transport["visibility_timeout"] = settings.visibility_timeout_s
        # kombu sweeps for jobs whose worker died every interval x throttle seconds (100 s by
        # default); sweep often enough that redelivery follows the visibility timeout closely.
        transport["unacked_restore_interval"] = min(10, max(1, settings.visibility_timeout_s // 4))
        transport["unacked_restore_throttle"] = 1
        if settings.broker_url.startswith("redis://"):
            config["broker_transport"] = "worker.redis_transport:Transport"
            transport[STUCK_AFTER_OPTION] = settings.stuck_after_s
    else:
        config["broker_heartbeat"] = settings.broker_heartbeat_s
    config.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=settings.window,
        worker_concurrency=1,
        worker_pool="solo",
        worker_soft_shutdown_timeout=SOFT_SHUTDOWN_TIMEOUT_S,
        worker_enable_soft_shutdown_on_idle=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.conf.update(config)
    app.register_task(GenerateTask())
    # Only omni.generate is served: Celery's built-in tasks (chords, groups, map...) sent to the
    # queue would otherwise run, fan out or retry forever.
    for name in [name for name in app.tasks if name != d.TASK_NAME]:
        app.tasks.unregister(name)
    app.omni_settings = settings
    return app


def credentials_refused(app: Celery) -> str | None:
    """Why the broker refuses the app's credentials, or None.

    A broker that cannot be reached yet is None too: Celery retries the connection at start, as it
    should for a broker that is starting. Refused credentials never pass, so the worker stops at once.
    """
    with app.connection_for_read() as connection:
        try:
            connection.connect()
        except CREDENTIALS_REFUSED as e:
            return f"{type(e).__name__}: {e}"
        except connection.connection_errors:
            return None
    return None
