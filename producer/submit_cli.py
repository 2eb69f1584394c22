"""`omni-batch submit JOBS.jsonl`: validate every line, then enqueue them all, or nothing.

Validating the whole file first means a typo on line 90,000 costs nothing: no half-submitted
batch to clean up. Heavy imports (celery, pydantic, tqdm) wait for the handler, so building the
CLI's parser, for any subcommand, stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from producer import defaults as d
from producer.cli import EXIT_FAILURE, EXIT_OK, UsageError

if TYPE_CHECKING:
    from producer.client import Client
    from producer.schema import Job

# Flags that give a default to lines lacking the field: (field, type, help).
DEFAULT_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("dataset", str, f"dataset name (schema default: {d.DEFAULT_DATASET})"),
    ("adapter", str, "adapter name under the worker's adapter roots (schema default: none, the base model)"),
    ("scale", float, "adapter scale, -8..8 (schema default: 1.0)"),
    ("steps", int, "inference steps, 1..200 (schema default: the model's)"),
    ("guidance_scale", float, "guidance scale, 0..50 (schema default: the model's)"),
    ("width", int, "image width, a multiple of 8 in 8..4096 (schema default: the model's)"),
    ("height", int, "image height, a multiple of 8 in 8..4096 (schema default: the model's)"),
    ("priority", int, f"0..9, 9 = most urgent (schema default: {d.DEFAULT_PRIORITY})"),
    ("output", str, f"s3://bucket/prefix or a directory (schema default: the worker's ${d.ENV_OUTPUT_URI})"),
)
MAX_PROBLEMS_SHOWN = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `submit` subcommand (entry point `omni_batch.commands:submit`)."""
    parser = subparsers.add_parser(
        "submit",
        help="validate a JSONL job file, then enqueue every job",
        description="Validate every line of JOBS.jsonl, then enqueue all the jobs; on any bad line, "
        "send nothing and exit 2.",
    )
    parser.add_argument("jobs", metavar="JOBS.jsonl", help="one JSON job per line; '-' reads stdin")
    parser.add_argument(
        "--broker",
        metavar="URL",
        help=f"broker URL (default: ${d.ENV_BROKER_URL}, else {d.DEFAULT_BROKER_URL})",
    )
    add_job_default_flags(parser)
    parser.set_defaults(handler=run)


def add_job_default_flags(parser: argparse.ArgumentParser) -> None:
    """`--dataset`, `--adapter`, ...: defaults for lines that lack the field (submit and run share them)."""
    group = parser.add_argument_group("defaults for lines that lack the field")
    for field, kind, text in DEFAULT_FLAGS:
        flag = "--" + field.replace("_", "-")
        group.add_argument(flag, dest=field, type=kind, metavar=field.split("_")[-1].upper(), help=text)


def read_jobs(args: argparse.Namespace, *, action: str = "sent") -> tuple[list[Job], int]:
    """Every job of `args.jobs` with the default flags applied, or UsageError naming each bad line.

    Returns the jobs and how many identical repeats were dropped.
    """
    job_defaults = {field: getattr(args, field) for field, _, _ in DEFAULT_FLAGS}
    job_defaults = {field: value for field, value in job_defaults.items() if value is not None}
    _check_defaults(job_defaults)
    return validate_file(args.jobs, job_defaults, action=action)


def run(args: argparse.Namespace) -> int:
    """Validate the file, enqueue it, print a summary. Bad input: UsageError (exit 2)."""
    from producer.client import Client
    from producer.errors import BrokerUnavailableError

    # 1. Check the flags once, then every line; send nothing unless all are good.
    jobs, duplicates = read_jobs(args)

    # 2. Enqueue, with a progress bar on stderr.
    client = Client(args.broker)
    try:
        _send(client, jobs)
    except BrokerUnavailableError as e:
        print(f"omni-batch submit: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        client.close()

    # 3. Summarise.
    datasets = Counter(job.dataset for job in jobs)
    print(f"submitted {len(jobs)} jobs to queue '{d.QUEUE}' on {client.safe_broker_url}")
    print("datasets: " + ", ".join(f"{name} ({n})" for name, n in sorted(datasets.items())))
    if duplicates:
        print(f"skipped {duplicates} duplicate line(s): same job, same job_id")
    return EXIT_OK


def _check_defaults(job_defaults: dict[str, Any]) -> None:
    from producer.errors import JobValidationError
    from producer.schema import validate_job

    try:
        validate_job({"prompt": "-", **job_defaults})
    except JobValidationError as e:
        raise UsageError(f"bad default flag: {e}") from e


def _read(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e


def validate_file(path: str, job_defaults: dict[str, Any], *, action: str) -> tuple[list[Job], int]:
    """Every job of the file, or UsageError listing each bad line; identical repeats dropped.

    The one reader of job files: submit, run, status and wait all count lines and derive ids alike.
    """
    from producer.errors import JobValidationError
    from producer.schema import parse_job_line

    name = "stdin" if path == "-" else path
    problems: list[str] = []
    bad_lines: set[int] = set()
    jobs: list[Job] = []
    seen: dict[str, tuple[int, Job]] = {}
    duplicates = 0
    # bytes.splitlines splits on \n, \r\n and \r only: never inside a JSON string.
    for lineno, raw in enumerate(_read(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            job = parse_job_line(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"), defaults=job_defaults)
        except UnicodeDecodeError as e:
            problems.append(f"line {lineno}: not UTF-8 ({e.reason} at byte {e.start})")
            bad_lines.add(lineno)
            continue
        except JobValidationError as e:
            problems.extend(f"line {lineno}: {problem}" for problem in e.problems)
            bad_lines.add(lineno)
            continue
        first = seen.setdefault(job.job_id, (lineno, job))
        if first[1] is job:
            jobs.append(job)
        elif first[1] == job:
            duplicates += 1
        else:
            problems.append(
                f"line {lineno}: job_id = {job.job_id!r}: line {first[0]} has a different job with this "
                "job_id (the idempotency key); give one of them its own job_id"
            )
            bad_lines.add(lineno)
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise UsageError(
            f"{name}: {len(bad_lines)} bad line(s); nothing was {action}:\n  " + "\n  ".join(shown)
        )
    if not jobs:
        raise UsageError(f"{name}: no jobs (the input is empty)")
    return jobs, duplicates


def _send(client: Client, jobs: list[Job]) -> None:
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in a log file.
    with tqdm(total=len(jobs), unit="job", desc="submitting", file=sys.stderr, disable=None) as bar:
        client.submit_many(jobs, progress=bar.update)
