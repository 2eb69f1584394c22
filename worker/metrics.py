"""Every Prometheus metric a worker exports, and the periodic summary line drawn from them.

Defined once, here; each fact is recorded by the code that knows it: an engine call's adapter
source and timings by `worker.execute.generate_group`, storage retries by `store_with_retry`,
a job settled (done, failed, skipped, requeued) by the consumer that acks it. The embedded
runner shares `generate_group` and `store`, so it records those too, but serves nothing; its
`RunSummary` counts its jobs. Names follow Prometheus' conventions:
an `omni_` prefix, base units (`_seconds`), `_total` on counters. No label carries a job id, an
adapter name or anything else unbounded or private: only an error type or an adapter source.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from omni_engine.lora.source import AdapterSource
from producer.errors import SettingsError
from producer.settings import ENV_METRICS_PORT

logger = logging.getLogger("omni.worker")

# Buckets for engine calls and adapter activations (a resident switch: about a millisecond; a
# cold SDXL load: seconds), and for the time a job spends in the broker and the window (up to hours).
_CALL_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

JOBS_DONE = Counter("omni_jobs_done", "Jobs whose image and sidecar were stored, then acked")
JOBS_FAILED = Counter(
    "omni_jobs_failed",
    "Jobs failed for good (an error record stored, then acked), by error type",
    ["error_type"],
)
JOBS_SKIPPED = Counter("omni_jobs_skipped", "Deliveries of jobs whose sidecar already existed: not generated")
JOBS_REQUEUED = Counter(
    "omni_jobs_requeued",
    "Jobs put back on the queue, not settled, by the error that stopped them",
    ["error_type"],
)
ADAPTER_ACTIVATIONS = Counter(
    "omni_adapter_activations",
    "Engine calls with an adapter, by where the adapter came from (resident, host, disk)",
    ["source"],
)
ADAPTER_LOAD_SECONDS = Histogram(
    "omni_adapter_load_seconds",
    "Time an engine call spent making its adapter active (switch, copy from host, or read), by source",
    ["source"],
    buckets=_CALL_BUCKETS,
)
ADAPTER_STALL_SECONDS = Counter(
    "omni_adapter_stall_seconds", "Time engine calls waited for adapter files to be read"
)
QUEUE_WAIT_SECONDS = Histogram(
    "omni_queue_wait_seconds",
    "Time from submission to the end of the job's engine call (broker, window and generation)",
    buckets=_WAIT_BUCKETS,
)
GENERATE_SECONDS = Histogram(
    "omni_generate_seconds", "Denoising time of one engine call (one group)", buckets=_CALL_BUCKETS
)
GROUP_JOBS = Histogram("omni_group_jobs", "Jobs in one engine call", buckets=_GROUP_BUCKETS)
STORE_SECONDS = Histogram(
    "omni_store_seconds",
    "Time of one attempt to store a job's image and sidecar (or error record)",
    buckets=_CALL_BUCKETS,
)
STORAGE_RETRIES = Counter(
    "omni_storage_retries", "Store attempts that found the storage unreachable and were retried"
)
WINDOW_JOBS = Gauge("omni_window_jobs", "Jobs held in the worker's window, waiting to be grouped")
WINDOW_CAPACITY = Gauge("omni_window_capacity_jobs", "Jobs the window holds at most (OMNI_WINDOW)")
FLEET_SHARD_QUEUES = Gauge(
    "omni_fleet_shard_queues", "Shard queues the fleet's plan gives this worker, besides omni"
)
FLEET_COORDINATOR = Gauge("omni_fleet_coordinator", "1 while this worker is the fleet's coordinator (plans)")
FLEET_STEALS = Counter(
    "omni_fleet_steals_total", "Times this worker, idle, took jobs from a shard queue the plan gives others"
)
WORKER = Info("omni_worker", "The worker's model and cache settings")

METRICS = (
    JOBS_DONE,
    JOBS_FAILED,
    JOBS_SKIPPED,
    JOBS_REQUEUED,
    ADAPTER_ACTIVATIONS,
    ADAPTER_LOAD_SECONDS,
    ADAPTER_STALL_SECONDS,
    QUEUE_WAIT_SECONDS,
    GENERATE_SECONDS,
    GROUP_JOBS,
    STORE_SECONDS,
    STORAGE_RETRIES,
    WINDOW_JOBS,
    WINDOW_CAPACITY,
    FLEET_SHARD_QUEUES,
    FLEET_COORDINATOR,
    FLEET_STEALS,
    WORKER,
)
# Every source is exported from the start, at zero, so rates and sums over sources are defined.
for _source in AdapterSource:
    ADAPTER_ACTIVATIONS.labels(_source.value)
    ADAPTER_LOAD_SECONDS.labels(_source.value)

_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_names() -> frozenset[str]:
    """The sample names a scrape of a worker can show for omni-batch's own metrics."""
    return frozenset(
        family.name + suffix
        for metric in METRICS
        for family in metric.describe()
        for suffix in _SAMPLE_SUFFIXES[family.type]
    )


def serve(port: int, *, info: dict[str, str]) -> None:
    """Serve /metrics on `port` (all interfaces) from a daemon thread; SettingsError if it is taken."""
    WORKER.info(info)
    try:
        start_http_server(port)
    except OSError as e:
        raise SettingsError(
            f"cannot serve metrics on port {port} (${ENV_METRICS_PORT}, --metrics-port): {e}"
        ) from e
    logger.info("metrics on port %d (/metrics)", port)


def observe_call(outputs: list[dict[str, Any]], queue_waits: list[float]) -> None:
    """One engine call, from its outputs' metadata: each adapter's source, the timings (the adapter
    time labelled with the costliest source, in a call that mixes adapters), its size, and its
    jobs' queue waits."""
    timings = outputs[0]["timings"]
    sources = {m["lora"]["path"]: m["adapter_source"] for m in outputs if m["lora"] is not None}
    for source in sources.values():
        ADAPTER_ACTIVATIONS.labels(source).inc()
    if sources:
        costliest = min(sources.values(), key=list(AdapterSource).index)
        ADAPTER_LOAD_SECONDS.labels(costliest).observe(timings["adapter_s"])
        ADAPTER_STALL_SECONDS.inc(timings["stall_s"])
    GENERATE_SECONDS.observe(timings["generate_s"])
    GROUP_JOBS.observe(len(outputs))
    for wait in queue_waits:
        QUEUE_WAIT_SECONDS.observe(wait)


def _total(counter: Counter) -> float:
    """A counter's value summed over its labels."""
    return sum(s.value for family in counter.collect() for s in family.samples if s.name.endswith("_total"))


class SummaryLog:
    """The periodic INFO line: jobs done and failed since the last one, images/s, the window."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = (time.monotonic(), _total(JOBS_DONE), _total(JOBS_FAILED))

    def maybe_log(self, window: int, capacity: int) -> None:
        """Log the line if `interval_s` has passed since the last (never when the interval is 0)."""
        now = time.monotonic()
        since, done_before, failed_before = self._last
        if not self.interval_s or now - since < self.interval_s:
            return
        done, failed = _total(JOBS_DONE), _total(JOBS_FAILED)
        self._last = (now, done, failed)
        elapsed = now - since
        logger.info(
            "summary done=%d failed=%d seconds=%.0f images_per_s=%.2f window=%d/%d "
            "done_total=%d failed_total=%d",
            done - done_before,
            failed - failed_before,
            elapsed,
            (done - done_before) / elapsed,
            window,
            capacity,
            done,
            failed,
        )
