"""Progress: a dataset's, read from its outputs (done, failed and pending jobs), and the one
progress bar every command a person waits on shows (`submit`, `run`, `demo`, `wait`).

Storage is the record of truth (a sidecar means done, an error record means failed), not Celery:
it outlives the broker and needs no result backend. Which jobs are still pending can only be
known from the job list itself, so the expected job ids are passed in.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from producer.layout import OutputKind, classify_key, dataset_prefix
from producer.storage import Storage


def progress_bar(total: int | None, *, desc: str, unit: str = "job", leave: bool = True) -> tqdm:
    """A bar on stderr while a person waits at a terminal; nothing at all when stderr is not a TTY
    (a log file, a pipe, CI), so logs hold only the summary. `leave=False` clears it when done."""
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, disable=None)


@dataclass(frozen=True)
class DatasetStatus:
    """A dataset's progress. `expected` and `pending` are None when the job list is not known."""

    dataset: str
    output: str
    done: int
    failed_job_ids: tuple[str, ...]
    expected: int | None

    @property
    def failed(self) -> int:
        return len(self.failed_job_ids)

    @property
    def pending(self) -> int | None:
        return None if self.expected is None else self.expected - self.done - self.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "output": self.output,
            "expected": self.expected,
            "done": self.done,
            "failed": self.failed,
            "pending": self.pending,
            "failed_job_ids": list(self.failed_job_ids),
        }


def dataset_status(storage: Storage, dataset: str, expected: frozenset[str] | None = None) -> DatasetStatus:
    """Count a dataset's outputs; given the expected job ids, only those count, the rest are pending."""
    done: set[str] = set()
    errored: set[str] = set()
    for key in storage.list_keys(dataset_prefix(dataset)):
        ref = classify_key(key)
        if ref is None or ref.dataset != dataset:
            continue
        if ref.kind is OutputKind.SIDECAR:
            done.add(ref.job_id)
        elif ref.kind is OutputKind.ERROR:
            errored.add(ref.job_id)
    if expected is not None:
        done &= expected
        errored &= expected
    # A job that failed once and then succeeded (resubmitted) is done.
    failed = tuple(sorted(errored - done))
    return DatasetStatus(dataset, storage.uri, len(done), failed, None if expected is None else len(expected))


def wait_for_jobs(
    storage: Storage,
    dataset: str,
    expected: frozenset[str],
    *,
    timeout: float | None,
    interval: float,
    on_progress: Callable[[DatasetStatus], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DatasetStatus:
    """Poll until no expected job is pending or `timeout` seconds have passed; return the last count.

    The caller tells a timeout from completion by `pending`. `clock` and `sleep` are the time source,
    replaceable so a test can drive the loop without real waiting.
    """
    deadline = None if timeout is None else clock() + timeout
    while True:
        status = dataset_status(storage, dataset, expected)
        if on_progress is not None:
            on_progress(status)
        if not status.pending:
            return status
        if deadline is None:
            sleep(interval)
            continue
        remaining = deadline - clock()
        if remaining <= 0:
            return status
        sleep(min(interval, remaining))
