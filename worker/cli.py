"""`omni-batch run` and `omni-batch demo`: the embedded runner from the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from producer import defaults as d
from producer.cli import EXIT_FAILURE, EXIT_OK, UsageError

DEFAULT_DEMO_OUT = "omni-demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    from producer.submit_cli import add_job_default_flags

    run = subparsers.add_parser(
        "run",
        help="run a JSONL job file in this process (no broker): scheduler, engine and storage",
        description="Validate every line of JOBS.jsonl, then run the jobs here with the worker's "
        "scheduler, engine and storage. Jobs whose sidecar exists are skipped.",
    )
    run.add_argument("jobs", metavar="JOBS.jsonl", help="one JSON job per line; '-' reads stdin")
    run.add_argument(
        "--out", metavar="URI", help="s3://bucket/prefix or a directory (default: $OMNI_OUTPUT_URI)"
    )
    run.add_argument(
        "--model", help="preset, local pipeline directory or diffusers id (default: $OMNI_MODEL)"
    )
    run.add_argument(
        "--adapter-root",
        dest="adapter_roots",
        action="append",
        metavar="DIR",
        help="where adapter names resolve; repeatable (default: $OMNI_ADAPTER_ROOTS)",
    )
    run.add_argument(
        "--max-loras", type=int, help="adapters resident in the model (default: $OMNI_MAX_LORAS or 4)"
    )
    run.add_argument("--max-cpu-loras", type=int, help="adapters held in host memory (default 16)")
    run.add_argument("--window", type=int, help="jobs considered together for grouping (default 64)")
    add_job_default_flags(run)
    run.set_defaults(handler=run_command)

    demo = subparsers.add_parser(
        "demo", help="make adapters for the tiny built-in model and run a mixed job list (no broker, no S3)"
    )
    demo.add_argument("--out", default=DEFAULT_DEMO_OUT, metavar="DIR", help=f"default: ./{DEFAULT_DEMO_OUT}")
    demo.set_defaults(handler=demo_command)

    worker = subparsers.add_parser(
        "worker",
        help="a Celery worker for omni.generate jobs (one process per GPU: set CUDA_VISIBLE_DEVICES)",
        description="Consume omni.generate jobs, group them by adapter, store images and sidecars.",
    )
    worker.add_argument(
        "--broker", metavar="URL", help="default: $OMNI_BROKER_URL or redis://localhost:6379/0"
    )
    worker.add_argument("--queues", default=d.QUEUE, help=f"comma-separated queues (default: {d.QUEUE})")
    worker.add_argument("--model", help="preset, pipeline directory or diffusers id (default: $OMNI_MODEL)")
    worker.add_argument("--adapter-root", dest="adapter_roots", action="append", metavar="DIR")
    worker.add_argument("--out", metavar="URI", help="default output (default: $OMNI_OUTPUT_URI)")
    worker.add_argument("--max-loras", type=int)
    worker.add_argument("--max-cpu-loras", type=int)
    worker.add_argument(
        "--max-batch",
        type=int,
        help="jobs per pipeline call (default: $OMNI_MAX_BATCH or 8; 1 makes every image independent "
        "of what it was batched with, bit for bit)",
    )
    worker.add_argument("--window", type=int, help="jobs reserved for grouping (default: $OMNI_WINDOW or 64)")
    worker.add_argument(
        "--idle", type=float, dest="idle_s", help="seconds without arrivals before a group runs"
    )
    worker.add_argument("--hostname", help="Celery node name (default: omni@<host>)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(handler=worker_command)


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="job", file=sys.stderr, disable=None)


def run_command(args: argparse.Namespace) -> int:
    from producer.submit_cli import read_jobs

    jobs, duplicates = read_jobs(args, action="run")

    from omni_engine import Omni
    from omni_engine.models.loader import quiet_library_output
    from producer.errors import StorageError
    from worker.embedded import run_jobs

    quiet_library_output()
    settings = _settings(args)
    if settings.output_uri is None and any(job.output is None for job in jobs):
        raise UsageError("some jobs have no output: give --out or set $OMNI_OUTPUT_URI")
    engine = Omni(
        settings.model,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        adapter_roots=list(settings.adapter_roots),
    )
    try:
        with _progress(len(jobs)) as bar:
            summary = run_jobs(jobs, engine=engine, settings=settings, on_done=bar.update)
    except StorageError as e:
        print(f"omni-batch run: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if duplicates:
        print(f"skipped {duplicates} duplicate line(s)")
    print("\n".join(summary.lines()))
    return EXIT_FAILURE if summary.failed else EXIT_OK


def demo_command(args: argparse.Namespace) -> int:
    from omni_engine.models.loader import quiet_library_output
    from worker.demo import demo_jobs, run_demo

    quiet_library_output()
    out = Path(args.out)
    print(
        f"omni-batch demo: {len(demo_jobs())} jobs over 4 adapters and the base model, tiny-sd3, into {out}/"
    )
    with _progress(len(demo_jobs())) as bar:
        summary, fifo = run_demo(out, on_done=bar.update)
    print("\n".join(summary.lines()))
    if summary.images:
        print(f"one-at-a-time arrival order would have loaded adapters {fifo} times with the same cache")
    print(f"images and sidecars: {out / 'images'}/")
    return EXIT_FAILURE if summary.failed else EXIT_OK


def _settings(args: argparse.Namespace, **extra: object):
    from worker.settings import WorkerSettings

    return WorkerSettings.from_env(
        model=args.model,
        adapter_roots=tuple(args.adapter_roots) if args.adapter_roots else None,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        window=args.window,
        output_uri=args.out,
        max_batch=getattr(args, "max_batch", None),
        **extra,
    )


def worker_command(args: argparse.Namespace) -> int:
    import socket

    from omni_engine.models.loader import quiet_library_output
    from worker.app import make_app

    quiet_library_output()
    # HTTP client logs carry request headers, and so the access key id, even at DEBUG.
    for library in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(library).setLevel(max(logging.INFO, logging.getLogger(library).level))
    settings = _settings(args, broker_url=args.broker, idle_s=args.idle_s)
    app = make_app(settings)
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--concurrency=1",
            f"--queues={args.queues}",
            f"--loglevel={args.loglevel}",
            f"--hostname={args.hostname or 'omni@' + socket.gethostname()}",
            "--without-mingle",
            "--without-gossip",
        ]
    )
    return EXIT_OK
