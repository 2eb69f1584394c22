"""Run one group of jobs (one adapter and one batch key, or several adapters mixed) as one engine
call, then store each result.

Generating and storing are separate steps so the Celery worker can store one group while the next
computes; the embedded runner does both in turn. Both write the same bytes.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from omni_engine import Omni
from omni_engine.device_errors import device_lost, drop_frames, out_of_memory
from omni_engine.errors import AdapterError, LoRACapacityError
from omni_engine.lora.request import LoRARequest
from producer.errors import StorageError, StorageUnavailableError
from producer.layout import IMAGE_CONTENT_TYPE, JSON_CONTENT_TYPE, error_key, image_key, sidecar_key
from producer.records import encode, error_record, sidecar
from producer.schema import Job
from producer.storage import Storage
from worker import metrics
from worker.errors import DeviceLostError, OutOfMemoryError
from worker.scheduler import Pending, SchedulerPolicy, take_next_group, upcoming_cold_adapters

logger = logging.getLogger("omni.worker")

# Failures that are the job's own and will not pass: recorded and acked, never retried.
PERMANENT_ERRORS = (AdapterError, LoRACapacityError, ValueError)


@dataclass(frozen=True)
class WorkItem:
    """A job ready to run: its adapter resolved, the storage its outputs go to."""

    job: Job
    request: LoRARequest | None
    storage: Storage
    submitted_at: float | None = None  # epoch seconds, from the producer's header when known


@dataclass
class Result:
    """What one job produced: an image and its sidecar record, or the error record of a failure."""

    item: WorkItem
    record: dict[str, Any]
    image: bytes | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes, the form stored."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def failure(item: WorkItem, error: BaseException) -> Result:
    """A job that failed for good: its error record, so status and reruns can see why."""
    return Result(item, error_record(item.job, error), error=error)


def take_group(
    engine: Omni, window: list[Pending], item_of: Callable[[Pending], WorkItem], *, policy: SchedulerPolicy
) -> list[Pending]:
    """The next group, taken from `window`; the engine starts reading, in the background, the cold
    adapters of the groups after it (as many as a call may mix, and one more for slack). `item_of`
    finds a Pending's WorkItem."""
    resident, host = engine.held_adapters()
    now = time.monotonic()
    group = take_next_group(window, resident=resident, host=host, now=now, policy=policy)
    # The group's own adapters are loaded by its call: never read them twice.
    held = {*host, *(p.adapter for p in group if p.adapter is not None)}
    wanted = upcoming_cold_adapters(
        window, resident=resident, host=held, now=now, policy=policy, limit=policy.mix_adapters + 1
    )
    requests = {}
    for pending in window:
        request = item_of(pending).request
        if request is not None and request.lora_path in wanted:
            requests.setdefault(request.lora_path, request)
    if wanted:
        engine.prefetch_loras([requests[path] for path in wanted])
    return group


def generate_group(engine: Omni, items: list[WorkItem]) -> list[Result]:
    """Generate every item in one call (each with its own adapter and scale); nothing is stored yet.

    Raises DeviceLostError when the device failed for good; any other failure of the call is
    settled here (split on out of memory, each adapter alone, or the jobs failed for good).
    """
    first = items[0].job
    try:
        generated = engine.generate(
            [item.job.prompt for item in items],
            lora_request=[item.request for item in items],
            lora_scale=[item.job.scale for item in items],
            seed=[item.job.seed for item in items],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            height=first.height,
            width=first.width,
            negative_prompt=first.negative_prompt,
        )
    except Exception as e:
        if device_lost(e, engine.device):
            raise DeviceLostError(f"the device failed: {type(e).__name__}: {e}") from e
        if out_of_memory(e) is None and not isinstance(e, PERMANENT_ERRORS):
            raise
        failed = drop_frames(e)
    else:
        return _results(items, generated)
    # Out of the except clause, and the failure's frames dropped: the failed call's tensors are freed
    # before any retry (inside it, a retry would run with the whole batch's memory still held).
    return _after_failure(engine, items, failed)


def _after_failure(engine: Omni, items: list[WorkItem], error: BaseException) -> list[Result]:
    if out_of_memory(error) is not None:
        if len(items) == 1:
            return [failure(items[0], OutOfMemoryError("out of device memory even as a batch of one"))]
        # Smaller batches need less memory: split, free what the failed call held, retry each half.
        logger.warning("out of memory with a batch of %d; splitting it", len(items))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(items) // 2
        return generate_group(engine, items[:half]) + generate_group(engine, items[half:])
    by_adapter: dict[str | None, list[int]] = {}
    for i, item in enumerate(items):
        by_adapter.setdefault(item.job.adapter, []).append(i)
    if len(by_adapter) > 1:
        # A mixed call: one adapter's fault must not fail the others' jobs. Each runs on its own.
        logger.warning("a call mixing %d adapters failed (%s); running each alone", len(by_adapter), error)
        results: list[Result] = [None] * len(items)  # type: ignore[list-item]  # all set below
        for indices in by_adapter.values():
            alone = generate_group(engine, [items[i] for i in indices])
            for i, result in zip(indices, alone, strict=True):
                results[i] = result
        return results
    # The adapter or the parameters are bad for every job of the group, for good.
    return [failure(item, error) for item in items]


def _results(items: list[WorkItem], generated: list[Any]) -> list[Result]:
    results, waits = [], []
    for item, output in zip(items, generated, strict=True):
        timings = {}
        if item.submitted_at is not None:
            timings["queue_wait_s"] = max(0.0, time.time() - item.submitted_at)
            waits.append(timings["queue_wait_s"])
        record = sidecar(item.job, output.metadata, timings)
        results.append(Result(item, record, image=png_bytes(output.images[0])))
    metadata = generated[0].metadata
    metrics.observe_call([output.metadata for output in generated], waits)
    calls = metadata["timings"]
    logger.info(
        "group adapter=%s jobs=%d source=%s seconds=%.3f adapter_s=%.3f generate_s=%.3f",
        "+".join(dict.fromkeys(item.job.adapter or "-" for item in items)),
        len(items),
        metadata["adapter_source"] or "-",
        calls["adapter_s"] + calls["generate_s"],
        calls["adapter_s"],
        calls["generate_s"],
    )
    return results


def store(result: Result) -> None:
    """Write the image, then the sidecar (its presence means done), or the error record."""
    job, storage = result.item.job, result.item.storage
    with metrics.STORE_SECONDS.time():
        if result.image is None:
            storage.put_bytes(
                error_key(job.dataset, job.job_id), encode(result.record), content_type=JSON_CONTENT_TYPE
            )
            return
        started = time.perf_counter()
        storage.put_bytes(image_key(job.dataset, job.job_id), result.image, content_type=IMAGE_CONTENT_TYPE)
        result.record["timings"]["store_s"] = time.perf_counter() - started
        storage.put_bytes(
            sidecar_key(job.dataset, job.job_id), encode(result.record), content_type=JSON_CONTENT_TYPE
        )


def store_with_retry(result: Result, *, attempts: int, backoff_s: float) -> StorageError | None:
    """Store, backing off while the storage is unreachable; the generated bytes are kept meanwhile.

    Returns None once stored, or the error that ended it: a StorageUnavailableError once the
    attempts are spent, or a permanent StorageError at once.
    """
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            store(result)
            return None
        except StorageUnavailableError as e:
            if attempt == attempts:
                return e
            metrics.STORAGE_RETRIES.inc()
            logger.warning(
                "storing job %s failed (%s); retry %d in %.1f s", result.item.job.job_id, e, attempt, delay
            )
            time.sleep(delay)  # backoff between attempts, not synchronisation
            delay *= 2
        except StorageError as e:
            return e
    return None
