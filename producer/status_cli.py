"""`omni-batch status` and `omni-batch wait`: how far a dataset has got, read from its outputs.

Storage is the record of truth (a sidecar means done, an error record means failed), not Celery:
it outlives the broker and needs no result backend. Which jobs are still pending can only be
known from the job list itself, so both commands take the JSONL file that was given to submit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from producer.cli import EXIT_FAILURE, EXIT_OK, UsageError
from producer.defaults import ENV_OUTPUT_URI
from producer.errors import InvalidStorageKeyError, InvalidStorageURIError, StorageError
from producer.outputs import OutputKind, classify_key, dataset_prefix, error_key
from producer.storage import Storage, open_storage

DEFAULT_WAIT_INTERVAL = 5.0  # seconds between two listings of the dataset
FAILURES_SHOWN = 5  # failed jobs whose reason the human summary prints
_REASON_CHARS = 200


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


def read_expected_job_ids(path: Path, dataset: str) -> frozenset[str]:
    """The ids of the dataset's jobs in a JSONL job file, derived as `submit --dataset D` derives them."""
    from producer.submit_cli import validate_file

    jobs, _ = validate_file(str(path), {"dataset": dataset}, action="counted")
    job_ids = frozenset(job.job_id for job in jobs if job.dataset == dataset)
    if not job_ids:
        raise UsageError(f"--jobs {path} holds no job for dataset {dataset!r}")
    return job_ids


def format_summary(status: DatasetStatus) -> str:
    """One line for people; `--json` is the form for scripts."""
    counts = f"{status.done} done, {status.failed} failed"
    if status.pending is None:
        counts += ", pending unknown (pass --jobs JOBS.jsonl to count it)"
    else:
        counts += f", {status.pending} pending, of {status.expected} jobs"
    return f"dataset {status.dataset!r} in {status.output}: {counts}"


def _failure_lines(storage: Storage, status: DatasetStatus) -> Iterator[str]:
    for job_id in status.failed_job_ids[:FAILURES_SHOWN]:
        record = storage.get_bytes(error_key(status.dataset, job_id))
        try:
            data = json.loads(record or b"")
            reason = " ".join(f"{data['error_type']}: {data['error']}".split())
        except (ValueError, TypeError, KeyError):
            reason = "(unreadable error record)"
        if len(reason) > _REASON_CHARS:
            reason = reason[: _REASON_CHARS - 3] + "..."
        yield f"  failed {job_id}: {reason}"
    if status.failed > FAILURES_SHOWN:
        yield f"  ... and {status.failed - FAILURES_SHOWN} more (--json lists them all)"


def _open_output(args: argparse.Namespace) -> Storage:
    uri = args.out or os.environ.get(ENV_OUTPUT_URI)
    if not uri:
        raise UsageError(f"no output location: pass --out URI or set {ENV_OUTPUT_URI}")
    try:
        return open_storage(uri)
    except InvalidStorageURIError as e:
        raise UsageError(str(e)) from e


def _print_report(storage: Storage, status: DatasetStatus) -> None:
    print(format_summary(status))
    for line in _failure_lines(storage, status):
        print(line)


def _status(args: argparse.Namespace) -> int:
    storage = _open_output(args)
    expected = read_expected_job_ids(args.jobs, args.dataset) if args.jobs else None
    try:
        status = dataset_status(storage, args.dataset, expected)
        if args.json:
            print(json.dumps(status.as_dict()))
        else:
            _print_report(storage, status)
    except StorageError as e:
        print(f"omni-batch status: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _wait(args: argparse.Namespace) -> int:
    storage = _open_output(args)
    expected = read_expected_job_ids(args.jobs, args.dataset)
    try:
        # disable=None: a bar on a terminal, nothing in a log file (as submit does).
        with tqdm(total=len(expected), desc=args.dataset, unit="job", file=sys.stderr, disable=None) as bar:

            def show(status: DatasetStatus) -> None:
                bar.n = status.done + status.failed
                bar.set_postfix(failed=status.failed, refresh=False)
                bar.refresh()

            status = wait_for_jobs(
                storage,
                args.dataset,
                expected,
                timeout=args.timeout,
                interval=args.interval,
                on_progress=show,
            )
        _print_report(storage, status)
    except StorageError as e:
        print(f"omni-batch wait: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if status.pending:
        print(
            f"omni-batch wait: timed out after {args.timeout:g} s with {status.pending} jobs pending",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_FAILURE if status.failed else EXIT_OK


def _dataset(value: str) -> str:
    try:
        dataset_prefix(value)
    except InvalidStorageKeyError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return value


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number of seconds >= 0")
    return seconds


def _positive_seconds(value: str) -> float:
    seconds = _seconds(value)
    if seconds == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return seconds


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, type=_dataset, help="the dataset to look at")
    parser.add_argument(
        "--out",
        metavar="URI",
        help=f"output root: s3://bucket/prefix or a directory (default: ${ENV_OUTPUT_URI})",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `status` and `wait` commands."""
    status = subparsers.add_parser(
        "status",
        help="count a dataset's done, failed and pending jobs",
        description="Count a dataset's done, failed and pending jobs from its outputs.",
    )
    _add_common(status)
    status.add_argument(
        "--jobs",
        metavar="JOBS.jsonl",
        type=Path,
        help="the job file given to submit; without it the pending count is unknown",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    status.set_defaults(handler=_status)

    wait = subparsers.add_parser(
        "wait",
        help="show a progress bar until every job of a dataset is done or failed",
        description="Wait until every job in JOBS.jsonl is done or failed. "
        "Exit 0 if all are done, 1 if any failed or the timeout passed.",
    )
    _add_common(wait)
    wait.add_argument(
        "--jobs", metavar="JOBS.jsonl", type=Path, required=True, help="the job file given to submit"
    )
    wait.add_argument(
        "--timeout", metavar="S", type=_seconds, help="give up after S seconds (exit 1); default: no limit"
    )
    wait.add_argument(
        "--interval",
        metavar="S",
        type=_positive_seconds,
        default=DEFAULT_WAIT_INTERVAL,
        help=f"seconds between two looks at the outputs (default: {DEFAULT_WAIT_INTERVAL:g})",
    )
    wait.set_defaults(handler=_wait)
