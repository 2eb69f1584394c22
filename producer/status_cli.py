"""`omni-batch status` and `omni-batch wait`: how far a dataset has got, read from its outputs.

Which jobs are still pending can only be known from the job list itself, so both commands take
the JSONL file that was given to submit, with the same default flags (`producer.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from producer.cli import EXIT_FAILURE, EXIT_OK, add_job_default_flags, job_defaults, read_jobs
from producer.errors import InvalidStorageURIError, StorageError, UsageError
from producer.layout import error_key
from producer.progress import DatasetStatus, dataset_status, progress_bar, wait_for_jobs
from producer.records import failure_reason
from producer.settings import ENV_OUTPUT_URI, read_environment
from producer.storage import Storage, open_storage

DEFAULT_WAIT_INTERVAL = 5.0  # seconds between two listings of the dataset
FAILURES_SHOWN = 5  # failed jobs whose reason the human summary prints
_REASON_CHARS = 200


def read_expected_job_ids(args: argparse.Namespace) -> frozenset[str]:
    """The ids of the dataset's jobs in `--jobs`, derived as `submit` with the same flags derives them."""
    jobs, _ = read_jobs(args, str(args.jobs), action="counted")
    job_ids = frozenset(job.job_id for job in jobs if job.dataset == args.dataset)
    if not job_ids:
        raise UsageError(f"--jobs {args.jobs} holds no job for dataset {args.dataset!r}")
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
        reason = failure_reason(storage.get_bytes(error_key(status.dataset, job_id)))
        reason = " ".join(reason.split()) if reason is not None else "(unreadable error record)"
        if len(reason) > _REASON_CHARS:
            reason = reason[: _REASON_CHARS - 3] + "..."
        yield f"  failed {job_id}: {reason}"
    if status.failed > FAILURES_SHOWN:
        yield f"  ... and {status.failed - FAILURES_SHOWN} more (--json lists them all)"


def _open_output(args: argparse.Namespace) -> Storage:
    job_defaults(args)  # a bad --dataset (or other default flag) is bad usage, with or without --jobs
    uri = args.out or read_environment().output_uri
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
    expected = read_expected_job_ids(args) if args.jobs else None
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
    expected = read_expected_job_ids(args)
    try:
        with progress_bar(len(expected), desc=args.dataset) as bar:

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


def _add_common(parser: argparse.ArgumentParser, *, jobs_required: bool) -> None:
    parser.add_argument(
        "--out",
        metavar="URI",
        help=f"output root: s3://bucket/prefix or a directory (default: ${ENV_OUTPUT_URI})",
    )
    parser.add_argument(
        "--jobs",
        metavar="JOBS.jsonl",
        type=Path,
        required=jobs_required,
        help="the job file given to submit"
        + ("" if jobs_required else "; without it the pending count is unknown"),
    )
    add_job_default_flags(parser, require_dataset=True)


def register_status(subparsers: argparse._SubParsersAction) -> None:
    """Add the `status` command (entry point `omni_batch.commands:status`)."""
    status = subparsers.add_parser(
        "status",
        help="count a dataset's done, failed and pending jobs",
        description="Count a dataset's done, failed and pending jobs from its outputs.",
    )
    _add_common(status, jobs_required=False)
    status.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    status.set_defaults(handler=_status)


def register_wait(subparsers: argparse._SubParsersAction) -> None:
    """Add the `wait` command (entry point `omni_batch.commands:wait`)."""
    wait = subparsers.add_parser(
        "wait",
        help="show a progress bar until every job of a dataset is done or failed",
        description="Wait until every job in JOBS.jsonl is done or failed. "
        "Exit 0 if all are done, 1 if any failed or the timeout passed.",
    )
    _add_common(wait, jobs_required=True)
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
