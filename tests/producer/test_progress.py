"""A dataset's progress, counted from its outputs, and the wait loop on a fake clock."""

from __future__ import annotations

import json
from pathlib import Path

from producer.layout import error_key, image_key, sidecar_key
from producer.progress import DatasetStatus, dataset_status, wait_for_jobs
from producer.records import JobStatus
from producer.storage import LocalStorage, Storage


def _done(storage: Storage, job_id: str, dataset: str = "ds") -> None:
    storage.put_bytes(image_key(dataset, job_id), b"\x89PNG", content_type="image/png")
    storage.put_bytes(sidecar_key(dataset, job_id), json.dumps({"status": JobStatus.OK}).encode())


def _failed(storage: Storage, job_id: str, dataset: str = "ds") -> None:
    storage.put_bytes(error_key(dataset, job_id), json.dumps({"status": JobStatus.FAILED}).encode())


def test_a_job_that_failed_and_then_succeeded_is_done(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    _failed(storage, "j1")
    _done(storage, "j1")
    _failed(storage, "j2")
    _done(storage, "other", dataset="ds2")
    status = dataset_status(storage, "ds", frozenset({"j1", "j2", "j3"}))
    assert (status.done, status.failed_job_ids, status.pending) == (1, ("j2",), 1)
    assert dataset_status(storage, "ds").pending is None  # no job list: pending is unknown


def test_wait_for_jobs_returns_once_the_last_output_appears(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    _done(storage, "j1")
    seen: list[DatasetStatus] = []
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        # The worker finishes j2 while `wait` sleeps.
        sleeps.append(seconds)
        _failed(storage, "j2")

    status = wait_for_jobs(
        storage,
        "ds",
        frozenset({"j1", "j2"}),
        timeout=None,
        interval=7.0,
        on_progress=seen.append,
        sleep=sleep,
    )
    assert [(s.done, s.failed, s.pending) for s in seen] == [(1, 0, 1), (1, 1, 0)]
    assert status == seen[-1]
    assert sleeps == [7.0]


def test_wait_for_jobs_gives_up_at_the_deadline(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    _done(storage, "j1")
    now = [100.0]
    sleeps: list[float] = []
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    status = wait_for_jobs(
        storage,
        "ds",
        frozenset({"j1", "j2"}),
        timeout=10.0,
        interval=4.0,
        on_progress=lambda _: polls.append(now[0]),
        clock=lambda: now[0],
        sleep=sleep,
    )
    assert sleeps == [4.0, 4.0, 2.0]  # never past the deadline
    assert polls == [100.0, 104.0, 108.0, 110.0]  # one last look at the deadline
    assert status.pending == 1
