"""The embedded runner: the worker's scheduler, engine and storage in one process, no broker.

Jobs enter a window as the Celery worker's reserved messages would; the same scheduler picks the
next group, so the images and the adapter loads match what the worker does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from omni_engine import Omni
from producer.errors import OutputNotAllowedError
from producer.schema import Job
from worker.admission import Admission, to_pending
from worker.execute import Result, WorkItem, failure, generate_group, store, take_group
from worker.scheduler import Pending
from worker.settings import WorkerSettings


@dataclass
class RunSummary:
    """What a run did: jobs seen, images made, and adapter loads against the least possible."""

    jobs: int = 0
    images: int = 0
    skipped: int = 0
    failed: int = 0
    adapter_loads: int = 0
    host_loads: int = 0
    min_loads: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        """The summary as the CLI prints it."""
        return [
            f"jobs        {self.jobs} ({self.skipped} already done, skipped)",
            f"images      {self.images}",
            f"failures    {self.failed}",
            f"adapter loads from disk {self.adapter_loads} (minimum possible {self.min_loads}), "
            f"from host memory {self.host_loads}",
            f"time        {self.seconds:.1f} s, {self.images_per_s:.2f} images/s",
        ]


def run_jobs(
    jobs: Iterable[Job],
    *,
    engine: Omni,
    settings: WorkerSettings,
    on_done: Callable[[int], None] | None = None,
) -> RunSummary:
    """Run every job not already done; the jobs' failures are recorded, never raised. A failed device
    (DeviceLostError) stops the run with the jobs left unrecorded, for a second run to do."""
    summary = RunSummary()
    started = time.perf_counter()
    stats_before = engine.lora_stats()
    admission = Admission(settings)
    policy = settings.policy_on(engine.device)
    queue = iter(jobs)
    window: list[Pending] = []
    adapters_used: set[str] = set()
    seen: set[str] = set()

    def refill() -> None:
        while len(window) < settings.window:
            job = next(queue, None)
            if job is None:
                return
            summary.jobs += 1
            # A job given twice runs once (the scheduler needs ids unique in its window).
            admitted = None if job.job_id in seen else _admit(admission, settings, job)
            if admitted is None:
                summary.skipped += 1
                _report(on_done, 1)
                continue
            seen.add(job.job_id)
            if isinstance(admitted, Result):
                store(admitted)
                summary.failed += 1
                _report(on_done, 1)
                continue
            window.append(to_pending(admitted, payload=admitted))

    refill()
    while window:
        group = take_group(engine, window, lambda pending: pending.payload, policy=policy)
        results = generate_group(engine, [p.payload for p in group])
        for result in results:
            store(result)
        ok = sum(r.ok for r in results)
        summary.images += ok
        summary.failed += len(results) - ok
        # The least loads possible: one per adapter that served a job (a mixed call serves several).
        adapters_used.update(r.item.job.adapter for r in results if r.ok and r.item.job.adapter is not None)
        _report(on_done, len(results))
        refill()

    stats = engine.lora_stats()
    summary.adapter_loads = stats["disk_loads"] - stats_before["disk_loads"]
    summary.host_loads = stats["cpu_hits"] - stats_before["cpu_hits"]
    summary.min_loads = len(adapters_used)
    summary.seconds = time.perf_counter() - started
    return summary


def _admit(admission: Admission, settings: WorkerSettings, job: Job) -> WorkItem | Result | None:
    """As the worker admits a job; one whose output is not allowed fails under the run's own output."""
    try:
        storage = admission.storage_for(job)
    except OutputNotAllowedError as e:
        if settings.output_uri is None:
            raise
        return failure(WorkItem(job, None, admission.storages.for_uri(settings.output_uri)), e)
    return admission.admit(job, storage)


def _report(on_done: Callable[[int], None] | None, count: int) -> None:
    if on_done is not None:
        on_done(count)
