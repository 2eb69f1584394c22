"""Admission: every job is skipped, failed with a record, or turned into work, in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from omni_engine.errors import AdapterNotFoundError
from producer.errors import InvalidStorageURIError
from producer.layout import sidecar_key
from producer.schema import validate_job
from worker.admission import Admission, to_pending
from worker.execute import Result, WorkItem
from worker.settings import WorkerSettings


@pytest.fixture
def admission(tmp_path: Path) -> Admission:
    (tmp_path / "adapters" / "styles" / "ink").mkdir(parents=True)
    return Admission(
        WorkerSettings(adapter_roots=(str(tmp_path / "adapters"),), output_uri=str(tmp_path / "out"))
    )


def test_a_job_whose_sidecar_exists_is_done(admission: Admission) -> None:
    job = validate_job({"prompt": "a cat"})
    storage = admission.storage_for(job)
    storage.put_bytes(sidecar_key(job.dataset, job.job_id), b"{}")
    assert admission.admit(job, storage) is None


def test_an_unknown_adapter_fails_the_job_with_its_record(admission: Admission) -> None:
    job = validate_job({"prompt": "a cat", "adapter": "styles/missing"})
    failed = admission.admit(job, admission.storage_for(job))
    assert isinstance(failed, Result) and not failed.ok
    assert isinstance(failed.error, AdapterNotFoundError)
    assert failed.record["status"] == "failed" and failed.record["error_type"] == "AdapterNotFoundError"


def test_a_runnable_job_becomes_a_pending_item_keyed_by_its_adapter_path(
    admission: Admission, tmp_path: Path
) -> None:
    job = validate_job({"prompt": "a cat", "adapter": "styles/ink", "priority": 7})
    item = admission.admit(job, admission.storage_for(job), submitted_at=12.5)
    assert isinstance(item, WorkItem) and item.submitted_at == 12.5
    pending = to_pending(item, payload="mine")
    assert pending.adapter == str((tmp_path / "adapters" / "styles" / "ink").resolve())
    assert (pending.job_id, pending.priority, pending.payload) == (job.job_id, 7, "mine")


def test_an_adapter_named_by_its_weights_file_resolves_to_that_file(
    admission: Admission, tmp_path: Path
) -> None:
    weights = tmp_path / "adapters" / "styles" / "ink" / "ink_v2.safetensors"
    weights.write_bytes(b"")  # resolving only checks the name; the engine reads and checks the file
    job = validate_job({"prompt": "a cat", "adapter": "styles/ink/ink_v2.safetensors"})
    item = admission.admit(job, admission.storage_for(job))
    assert isinstance(item, WorkItem)
    assert to_pending(item, payload=None).adapter == str(weights.resolve())


def test_a_job_with_no_output_anywhere_is_refused() -> None:
    admission = Admission(WorkerSettings())
    with pytest.raises(InvalidStorageURIError, match="no output"):
        admission.storage_for(validate_job({"prompt": "a cat"}))
