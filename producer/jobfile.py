"""The job file: JSONL, one job per line, read whole and validated before any job is used.

The one reader of job files: submit, run, status and wait all count lines, apply defaults and
derive ids alike, so a job's id in `status` is the id `submit` sent. Validating the whole file
first means a typo on line 90,000 costs nothing: no half-submitted batch to clean up.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

from producer.errors import JobFileError, JobValidationError
from producer.schema import Job, parse_job_line

STDIN = "-"
MAX_PROBLEMS_SHOWN = 20


class JobFile(NamedTuple):
    """The distinct jobs of a file in order, and how many identical repeats were dropped."""

    jobs: list[Job]
    duplicates: int


def _read(path: str) -> bytes:
    try:
        if path == STDIN:
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise JobFileError(f"cannot read {path}: {e.strerror or e}") from e


class JobCollector:
    """Gathers a batch of jobs before any is sent: distinct jobs in order, every problem by place.

    The one rule for a batch, shared by the job file and the HTTP API: identical repeats are
    dropped, two different jobs with one job_id are an error, and any problem refuses the batch.
    A place is what a problem is reported under: `line 3`, `jobs[2]`.
    """

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.duplicates = 0
        self.problems: list[str] = []
        self.bad_places: set[str] = set()
        self._seen: dict[str, tuple[str, Job]] = {}

    def reject(self, place: str, problems: list[str]) -> None:
        """Record why the job at `place` is refused."""
        self.problems.extend(f"{place}: {problem}" for problem in problems)
        self.bad_places.add(place)

    def add(self, place: str, job: Job) -> None:
        """Keep `job` unless an identical one came first, or refuse it if another job has its id."""
        first = self._seen.setdefault(job.job_id, (place, job))
        if first[1] is job:
            self.jobs.append(job)
        elif first[1] == job:
            self.duplicates += 1
        else:
            self.reject(
                place,
                [
                    f"job_id = {job.job_id!r}: {first[0]} has a different job with this job_id "
                    "(the idempotency key); give one of them its own job_id"
                ],
            )


def read_job_file(path: str, defaults: Mapping[str, Any] | None = None, *, action: str) -> JobFile:
    """Every job of the file (`-`: stdin), `defaults` filling the fields a line lacks.

    Raises JobFileError listing each bad line (and saying nothing was `action`), or when the file
    holds no job. Identical repeats are dropped; two different jobs with one job_id are an error.
    """
    name = "stdin" if path == STDIN else path
    batch = JobCollector()
    # bytes.splitlines splits on \n, \r\n and \r only: never inside a JSON string.
    for lineno, raw in enumerate(_read(path).splitlines(), start=1):
        if not raw.strip():
            continue
        place = f"line {lineno}"
        try:
            job = parse_job_line(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"), defaults=defaults)
        except UnicodeDecodeError as e:
            batch.reject(place, [f"not UTF-8 ({e.reason} at byte {e.start})"])
            continue
        except JobValidationError as e:
            batch.reject(place, e.problems)
            continue
        batch.add(place, job)
    if batch.problems:
        shown = batch.problems[:MAX_PROBLEMS_SHOWN]
        if len(batch.problems) > len(shown):
            shown.append(f"... and {len(batch.problems) - len(shown)} more")
        raise JobFileError(
            f"{name}: {len(batch.bad_places)} bad line(s); nothing was {action}:\n  " + "\n  ".join(shown),
            batch.problems,
        )
    if not batch.jobs:
        raise JobFileError(f"{name}: no jobs (the input is empty)")
    return JobFile(batch.jobs, batch.duplicates)
