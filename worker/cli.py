"""`omni-batch run` and `omni-batch demo`: the embedded runner from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from producer.cli import EXIT_FAILURE, EXIT_OK

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
    from worker.settings import WorkerSettings

    quiet_library_output()
    settings = WorkerSettings.from_env(
        model=args.model,
        adapter_roots=tuple(args.adapter_roots) if args.adapter_roots else None,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        window=args.window,
        output_uri=args.out,
    )
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
