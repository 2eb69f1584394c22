"""Run one group of jobs (one adapter, one batch key) as one engine call, and store each result.

Shared by the Celery worker and the embedded runner, so both write the same bytes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Hashable
from dataclasses import dataclass

from omni_engine import Omni
from omni_engine.errors import AdapterError, LoRACapacityError
from omni_engine.lora.request import LoRARequest
from producer import outputs
from producer.schema import Job
from producer.storage import Storage
from worker.sidecar import encode, error_record, sidecar


@dataclass(frozen=True)
class WorkItem:
    job: Job
    request: LoRARequest | None
    storage: Storage
    submitted_at: float | None = None  # epoch seconds, from the producer's header when known


@dataclass(frozen=True)
class Outcome:
    job_id: str
    ok: bool
    error: str | None = None


def batch_key(job: Job) -> tuple[Hashable, ...]:
    """Jobs may share a pipeline call only when everything but prompt and seed is equal."""
    return (job.width, job.height, job.steps, job.guidance_scale, job.scale, job.negative_prompt)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def record_failure(item: WorkItem, error: BaseException) -> Outcome:
    """A job that failed for good: its error record, so status and reruns can see why."""
    job = item.job
    item.storage.put_bytes(
        outputs.error_key(job.dataset, job.job_id),
        encode(error_record(job, error)),
        content_type=outputs.JSON_CONTENT_TYPE,
    )
    return Outcome(job.job_id, ok=False, error=str(error))


def run_group(engine: Omni, items: list[WorkItem]) -> list[Outcome]:
    """Generate every item in one call; store each image, then its sidecar (its presence means done)."""
    first = items[0].job
    try:
        results = engine.generate(
            [item.job.prompt for item in items],
            lora_request=items[0].request,
            lora_scale=first.scale,
            seed=[item.job.seed for item in items],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            height=first.height,
            width=first.width,
            negative_prompt=first.negative_prompt,
        )
    except (AdapterError, LoRACapacityError, ValueError) as e:
        # The adapter or the parameters are bad for every job of the group, for good.
        return [record_failure(item, e) for item in items]

    done = []
    for item, result in zip(items, results, strict=True):
        job = item.job
        started = time.perf_counter()
        item.storage.put_bytes(
            outputs.image_key(job.dataset, job.job_id),
            png_bytes(result.images[0]),
            content_type=outputs.IMAGE_CONTENT_TYPE,
        )
        timings = {"store_s": time.perf_counter() - started}
        if item.submitted_at is not None:
            timings["queue_wait_s"] = max(0.0, time.time() - item.submitted_at)
        item.storage.put_bytes(
            outputs.sidecar_key(job.dataset, job.job_id),
            encode(sidecar(job, result.metadata, timings)),
            content_type=outputs.JSON_CONTENT_TYPE,
        )
        done.append(Outcome(job.job_id, ok=True))
    return done
