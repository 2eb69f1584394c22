"""Admission: from a job to work the scheduler can place, or to an outcome that needs no work.

The Celery worker and the embedded runner admit every job here, in the same steps, so they skip,
fail and group jobs alike:
1. a job whose sidecar exists is done (a redelivery, or the same job sent again): skipped;
2. its adapter name resolves under the worker's adapter roots (an adapter in object storage is
   fetched into the local cache here), or the job fails for good, with an error record that names
   the reason; an adapter root that cannot be reached raises StorageUnavailableError, for the
   caller to put the job back (the Celery worker) or stop (the embedded runner);
3. what is left is a WorkItem, which enters the window as a scheduler `Pending`.
"""

from __future__ import annotations

import time

from omni_engine.errors import AdapterError
from producer.errors import StorageError, StorageUnavailableError
from producer.layout import sidecar_key
from producer.schema import Job
from producer.storage import Storage
from worker.adapter_cache import AdapterCache
from worker.adapters import AdapterResolver
from worker.execute import Result, WorkItem, failure
from worker.output_roots import OutputRoots
from worker.scheduler import Pending
from worker.settings import WorkerSettings
from worker.storage_cache import StorageCache


class Admission:
    """The adapter roots and the open storages of one worker, and the steps every job goes through."""

    def __init__(self, settings: WorkerSettings) -> None:
        cache = None
        if settings.has_remote_adapter_roots:
            cache = AdapterCache(
                settings.adapter_cache_path,
                max_bytes=settings.adapter_cache_bytes,
                # What this worker may still read: its window's adapters and its engine's.
                in_use=settings.window + settings.max_cpu_loras,
                endpoint_url=settings.s3_endpoint_url,
            )
        self.resolver = AdapterResolver(settings.adapter_roots, cache=cache)
        self.storages = StorageCache(
            settings.output_uri, settings.s3_endpoint_url, roots=OutputRoots(settings.allowed_outputs)
        )

    def storage_for(self, job: Job) -> Storage:
        """Where the job's outputs go; InvalidStorageURIError when it has no usable output,
        OutputNotAllowedError when it names one outside the worker's allowed outputs."""
        return self.storages.for_job(job)

    def admit(
        self, job: Job, storage: Storage, *, submitted_at: float | None = None
    ) -> WorkItem | Result | None:
        """The job's work item; its failure (a Result to store) when its adapter cannot be used;
        None when it is done already.

        An output storage that cannot be reached counts as "not done": the store step retries, and at
        worst a job is generated twice. A permanent output storage error (no such bucket) is raised;
        so is an adapter root that cannot be reached (StorageUnavailableError), while one that
        refuses for good (no such bucket, access denied) fails the job.
        """
        # 1. Done already?
        try:
            if storage.exists(sidecar_key(job.dataset, job.job_id)):
                return None
        except StorageUnavailableError:
            pass
        # 2. The adapter, only ever under the worker's roots.
        try:
            request = self.resolver.resolve(job.adapter) if job.adapter else None
        except StorageUnavailableError:
            raise
        except (AdapterError, StorageError) as e:
            return failure(WorkItem(job, None, storage), e)
        # 3. The work.
        return WorkItem(job, request, storage, submitted_at)


def to_pending(item: WorkItem, *, payload: object) -> Pending:
    """The item as the scheduler sees it, arriving now; `payload` is handed back with its group."""
    return Pending(
        job_id=item.job.job_id,
        adapter=item.request.lora_path if item.request else None,
        batch_key=item.job.batch_key(),
        call_key=item.job.call_key(),
        arrived=time.monotonic(),
        priority=item.job.priority,
        payload=payload,
    )
