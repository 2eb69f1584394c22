"""`omni-batch run`, `demo` and `worker`: the commands that need the worker extra.

Each registers through its own entry point; registering imports nothing heavy (the settings and
the scheduler are torch-free), so the CLI lists these commands even where torch is not installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from omni_engine.lora.fuse_mode import FuseMode
from omni_engine.models.presets import DEFAULT_MODEL
from producer import defaults as d
from producer.cli import EXIT_FAILURE, EXIT_OK, add_job_default_flags, read_jobs
from producer.client import grouped_order
from producer.errors import UsageError
from producer.settings import (
    ENV_ADAPTER_CACHE_BYTES,
    ENV_ADAPTER_CACHE_DIR,
    ENV_ADAPTER_ROOTS,
    ENV_AFFINITY,
    ENV_BROKER_HEARTBEAT,
    ENV_BROKER_URL,
    ENV_CACHE_DIR,
    ENV_COMPILE,
    ENV_FUSE,
    ENV_MAX_BATCH,
    ENV_MAX_CPU_LORAS,
    ENV_MAX_LORAS,
    ENV_METRICS_PORT,
    ENV_MIX_ADAPTERS,
    ENV_MODEL,
    ENV_OUTPUT_ROOTS,
    ENV_OUTPUT_URI,
    ENV_STUCK_AFTER,
    ENV_SUMMARY_INTERVAL,
    ENV_WINDOW,
)
from worker.scheduler import DEFAULT_MAX_BATCH
from worker.settings import (
    DEFAULT_ADAPTER_CACHE_BYTES,
    DEFAULT_BROKER_HEARTBEAT_S,
    DEFAULT_MAX_CPU_LORAS,
    DEFAULT_MAX_LORAS,
    DEFAULT_MIX_ADAPTERS,
    DEFAULT_STUCK_AFTER_S,
    DEFAULT_SUMMARY_INTERVAL_S,
    DEFAULT_WINDOW,
    WorkerSettings,
)

DEFAULT_DEMO_OUT = "omni-demo"
# Integer flags of `run` and `worker`: (flag, environment variable, default, what it sets).
_ENGINE_LIMITS = (
    ("--max-loras", ENV_MAX_LORAS, DEFAULT_MAX_LORAS, "adapters resident in the model"),
    ("--max-cpu-loras", ENV_MAX_CPU_LORAS, DEFAULT_MAX_CPU_LORAS, "adapters held in host memory"),
    ("--window", ENV_WINDOW, DEFAULT_WINDOW, "jobs considered together for grouping"),
    (
        "--max-batch",
        ENV_MAX_BATCH,
        DEFAULT_MAX_BATCH,
        "jobs per pipeline call; 1 makes every image independent of what it was batched with, bit for bit",
    ),
    (
        "--mix-adapters",
        ENV_MIX_ADAPTERS,
        f"{DEFAULT_MIX_ADAPTERS} on a GPU, 1 on a CPU",
        "adapters one pipeline call may mix, at most --max-loras; 1 never mixes",
    ),
)


def _add_engine_flags(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """What `run` and `worker` share: the model, the adapters, the caches, the window, the output."""
    parser.add_argument("--out", metavar="URI", help=f"{out_help} (default: ${ENV_OUTPUT_URI})")
    parser.add_argument(
        "--model",
        help=f"preset, local pipeline directory or diffusers id (default: ${ENV_MODEL} or {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--adapter-root",
        dest="adapter_roots",
        action="append",
        metavar="ROOT",
        help=f"a directory or s3://bucket/prefix adapter names resolve under; repeatable, the first hit "
        f"wins (default: ${ENV_ADAPTER_ROOTS})",
    )
    parser.add_argument(
        "--adapter-cache-dir",
        metavar="DIR",
        help=f"where adapters from s3:// roots are fetched to (default: ${ENV_ADAPTER_CACHE_DIR}, "
        f"else ${ENV_CACHE_DIR}/adapters)",
    )
    parser.add_argument(
        "--adapter-cache-bytes",
        type=int,
        metavar="N",
        help=f"bytes of fetched adapters kept on disk, least recently used removed first "
        f"(default: ${ENV_ADAPTER_CACHE_BYTES} or {DEFAULT_ADAPTER_CACHE_BYTES})",
    )
    for flag, env, default, text in _ENGINE_LIMITS:
        parser.add_argument(flag, type=int, help=f"{text} (default: ${env} or {default})")
    parser.add_argument(
        "--fuse",
        choices=[mode.value for mode in FuseMode],
        help="merge a call's adapter into the weights: auto (calls with enough images x steps), "
        f"always or never (default: ${ENV_FUSE} or {FuseMode.AUTO.value})",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="compile the denoiser once with torch.compile (default backend: inductor); switching "
        f"adapters never recompiles it (default: ${ENV_COMPILE}, else not compiled)",
    )


def register_run(subparsers: argparse._SubParsersAction) -> None:
    """Add the `run` command (entry point `omni_batch.commands:run`)."""
    run = subparsers.add_parser(
        "run",
        help="run a JSONL job file in this process (no broker): scheduler, engine and storage",
        description="Validate every line of JOBS.jsonl, then run the jobs here with the worker's "
        "scheduler, engine and storage. Jobs whose sidecar exists are skipped.",
    )
    run.add_argument("jobs", metavar="JOBS.jsonl", help="one JSON job per line; '-' reads stdin")
    _add_engine_flags(run, out_help="s3://bucket/prefix or a directory")
    add_job_default_flags(run)
    run.set_defaults(handler=run_command)


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` command (entry point `omni_batch.commands:demo`)."""
    demo = subparsers.add_parser(
        "demo", help="make adapters for the tiny built-in model and run a mixed job list (no broker, no S3)"
    )
    demo.add_argument("--out", default=DEFAULT_DEMO_OUT, metavar="DIR", help=f"default: ./{DEFAULT_DEMO_OUT}")
    demo.set_defaults(handler=demo_command)


def register_worker(subparsers: argparse._SubParsersAction) -> None:
    """Add the `worker` command (entry point `omni_batch.commands:worker`)."""
    worker = subparsers.add_parser(
        "worker",
        help="a Celery worker for omni.generate jobs (one process per GPU: set CUDA_VISIBLE_DEVICES)",
        description="Consume omni.generate jobs, group them by adapter, store images and sidecars.",
    )
    worker.add_argument(
        "--broker", metavar="URL", help=f"default: ${ENV_BROKER_URL} or {d.DEFAULT_BROKER_URL}"
    )
    worker.add_argument("--queues", default=d.QUEUE, help=f"comma-separated queues (default: {d.QUEUE})")
    _add_engine_flags(worker, out_help="the output of jobs that name none")
    worker.add_argument(
        "--idle", type=float, dest="idle_s", help="seconds without arrivals before a group runs"
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help=f"serve Prometheus metrics at http://HOST:PORT/metrics (default: ${ENV_METRICS_PORT}, else off)",
    )
    worker.add_argument(
        "--summary-interval",
        type=float,
        dest="summary_interval_s",
        metavar="S",
        help=f"seconds between summary lines in the log, 0 for none "
        f"(default: ${ENV_SUMMARY_INTERVAL} or {DEFAULT_SUMMARY_INTERVAL_S:g})",
    )
    worker.add_argument(
        "--stuck-after",
        type=int,
        dest="stuck_after_s",
        metavar="S",
        help=f"seconds a consumer may do nothing before it is taken for hung: its job leases lapse and it "
        f"leaves the fleet, so other workers take its jobs; 0 for never "
        f"(default: ${ENV_STUCK_AFTER} or {DEFAULT_STUCK_AFTER_S})",
    )
    worker.add_argument(
        "--broker-heartbeat",
        type=int,
        dest="broker_heartbeat_s",
        metavar="S",
        help=f"RabbitMQ: the AMQP heartbeat timeout in seconds; RabbitMQ returns the jobs of a worker whose "
        f"host vanished after about this long (heartbeats go on while a group runs); 0 for none "
        f"(default: ${ENV_BROKER_HEARTBEAT} or {DEFAULT_BROKER_HEARTBEAT_S})",
    )
    worker.add_argument(
        "--affinity",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"share adapters out across the fleet (docs/scheduling.md; Redis brokers only) "
        f"(default: ${ENV_AFFINITY} or on)",
    )
    worker.add_argument("--hostname", help="Celery node name (default: omni@<host>)")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(handler=worker_command)


def _settings(args: argparse.Namespace, **extra: object) -> WorkerSettings:
    return WorkerSettings.from_env(
        model=args.model,
        adapter_roots=tuple(args.adapter_roots) if args.adapter_roots else None,
        adapter_cache_dir=args.adapter_cache_dir,
        adapter_cache_bytes=args.adapter_cache_bytes,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        window=args.window,
        output_uri=args.out,
        max_batch=args.max_batch,
        mix_adapters=args.mix_adapters,
        fuse=args.fuse,
        compile=args.compile,
        **extra,
    )


def run_command(args: argparse.Namespace) -> int:
    """Validate the file, then run every job here; exit 1 if any failed."""
    jobs, duplicates = read_jobs(args, args.jobs, action="run")

    from omni_engine.models.loader import quiet_library_output
    from producer.errors import StorageError
    from producer.progress import progress_bar
    from worker.embedded import run_jobs
    from worker.errors import DeviceLostError
    from worker.settings import build_engine

    quiet_library_output()
    settings = _settings(args)
    if settings.output_uri is None and any(job.output is None for job in jobs):
        raise UsageError(f"some jobs have no output: give --out or set ${ENV_OUTPUT_URI}")
    engine = build_engine(settings)
    try:
        with progress_bar(len(jobs), desc="running") as bar:
            # In the order `submit` queues a file: each adapter's jobs together.
            summary = run_jobs(grouped_order(jobs), engine=engine, settings=settings, on_done=bar.update)
    except StorageError as e:
        print(f"omni-batch run: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except DeviceLostError as e:
        # Nothing was recorded against the jobs left: a second run does them, skipping those done.
        print(f"omni-batch run: {e}; run the same command again to do the jobs left", file=sys.stderr)
        return EXIT_FAILURE
    if duplicates:
        print(f"skipped {duplicates} duplicate line(s)")
    print("\n".join(summary.lines()))
    return EXIT_FAILURE if summary.failed else EXIT_OK


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo and print what grouping saved."""
    from omni_engine.models.loader import quiet_library_output
    from producer.progress import progress_bar
    from worker.demo import DEMO_ADAPTERS, demo_jobs, run_demo

    quiet_library_output()
    out = Path(args.out)
    print(
        f"omni-batch demo: {len(demo_jobs())} jobs over {len(DEMO_ADAPTERS)} adapters and the base model, "
        f"{DEFAULT_MODEL}, into {out}/"
    )
    with progress_bar(len(demo_jobs()), desc="demo") as bar:
        summary, fifo = run_demo(out, on_done=bar.update)
    print("\n".join(summary.lines()))
    if summary.images:
        print(f"one-at-a-time arrival order would have loaded adapters {fifo} times with the same cache")
    print(f"images and sidecars: {out / 'images'}/")
    return EXIT_FAILURE if summary.failed else EXIT_OK


def worker_command(args: argparse.Namespace) -> int:
    """Start the Celery worker in this process; at shutdown, its exit code.

    Non-zero when it stopped on an error it cannot recover from (the broker refused its
    credentials, the model did not load, the device failed, an error escaped the consumer), so a
    supervisor restarts it.
    """
    import socket

    from celery import signals

    from omni_engine.models.loader import quiet_library_output
    from producer.redact import redact
    from worker.app import credentials_refused, make_app

    quiet_library_output()
    # HTTP client logs carry request headers, and so the access key id, even at DEBUG.
    for library in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(library).setLevel(max(logging.INFO, logging.getLogger(library).level))
    settings = _settings(
        args,
        broker_url=args.broker,
        idle_s=args.idle_s,
        metrics_port=args.metrics_port,
        summary_interval_s=args.summary_interval_s,
        affinity=args.affinity,
        stuck_after_s=args.stuck_after_s,
        broker_heartbeat_s=args.broker_heartbeat_s,
    )
    if not settings.allowed_outputs:
        raise UsageError(
            f"the worker has nowhere to write: give --out, or set ${ENV_OUTPUT_URI} or ${ENV_OUTPUT_ROOTS}"
        )
    if settings.metrics_port:
        _serve_metrics(settings)
    app = make_app(settings)
    refused = credentials_refused(app)
    if refused is not None:
        broker = redact(settings.broker_url)
        print(f"omni-batch worker: the broker {broker} refused the credentials: {refused}", file=sys.stderr)
        return EXIT_FAILURE
    # The Celery worker's exit code (1 after an unrecoverable error), which worker_main drops.
    workers: list[Any] = []
    signals.worker_init.connect(lambda sender, **_: workers.append(sender), weak=False)
    signals.worker_shutdown.connect(lambda **_: _close_consumer(app), weak=False)
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
    return (workers[-1].exitcode or EXIT_OK) if workers else EXIT_FAILURE


def _close_consumer(app: Any) -> None:
    """At any stop: out of the fleet at once (its shards go to others without waiting for expiry),
    and the consumer's side threads stopped."""
    grouping = getattr(app, "omni_consumer", None)
    if grouping is not None:
        grouping.close()


def _serve_metrics(settings: WorkerSettings) -> None:
    """Start the metrics endpoint before the model loads, so a scrape sees a worker that is starting."""
    from importlib.metadata import version

    from worker import metrics

    metrics.serve(
        settings.metrics_port,
        info={
            "version": version("omni-batch"),
            "model": settings.model,
            "max_loras": str(settings.max_loras),
            "max_cpu_loras": str(settings.max_cpu_loras),
            "max_batch": str(settings.max_batch),
            # The engine is not loaded yet: unset means "by device" (docs/performance.md).
            "mix_adapters": str(settings.mix_adapters or "by device"),
            "fuse": settings.fuse.value,
        },
    )
