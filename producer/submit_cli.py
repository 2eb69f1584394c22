"""`omni-batch submit JOBS.jsonl`: validate every line, then enqueue them all, or nothing."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import TYPE_CHECKING

from producer import defaults as d
from producer.cli import EXIT_FAILURE, EXIT_OK, add_job_default_flags, read_jobs
from producer.routing import describe_queues
from producer.settings import ENV_BROKER_URL

if TYPE_CHECKING:
    from producer.client import Client
    from producer.schema import Job


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `submit` command (entry point `omni_batch.commands:submit`)."""
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
        help=f"broker URL (default: ${ENV_BROKER_URL}, else {d.DEFAULT_BROKER_URL})",
    )
    add_job_default_flags(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Validate the file, enqueue it, print a summary. Bad input: UsageError (exit 2)."""
    from producer.client import Client
    from producer.errors import BrokerUnavailableError

    # 1. Check the flags once, then every line; send nothing unless all are good.
    jobs, duplicates = read_jobs(args, args.jobs, action="sent")

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
    print(f"submitted {len(jobs)} jobs to {describe_queues(client.sent_to)} on {client.safe_broker_url}")
    print("datasets: " + ", ".join(f"{name} ({n})" for name, n in sorted(datasets.items())))
    if duplicates:
        print(f"skipped {duplicates} duplicate line(s): same job, same job_id")
    return EXIT_OK


def _send(client: Client, jobs: list[Job]) -> None:
    from producer.progress import progress_bar

    with progress_bar(len(jobs), desc="submitting") as bar:
        client.submit_many(jobs, progress=bar.update)
