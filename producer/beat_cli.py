"""`omni-batch beat --schedule FILE` sends scheduled datasets; `omni-batch schedule list` shows them."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from producer import defaults as d
from producer.cli import EXIT_FAILURE, EXIT_OK
from producer.errors import UsageError
from producer.settings import ENV_ADAPTER_ROOTS, ENV_BROKER_URL, read_environment

if TYPE_CHECKING:
    import redis

    from producer.schedule_file import Schedule

DEFAULT_MAX_INTERVAL_S = 5.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_CONNECT_TIMEOUT_S = 5


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", metavar="FILE", required=True, help="the schedules file (YAML)")
    parser.add_argument(
        "--broker",
        metavar="URL",
        help=f"Redis broker URL; beat keeps its state there too (default: ${ENV_BROKER_URL}, "
        f"else {d.DEFAULT_BROKER_URL})",
    )
    parser.add_argument(
        "--adapter-root",
        metavar="DIR",
        action="append",
        dest="adapter_roots",
        help=f"refuse jobs whose adapter is not under DIR (repeatable; default: ${ENV_ADAPTER_ROOTS}; "
        "with no root, adapter names are checked for form only)",
    )


def _load(args: argparse.Namespace) -> tuple[list[Schedule], str]:
    """The validated schedules (ScheduleFileError, exit 2, on any problem) and the Redis broker URL."""
    from producer.schedule_file import load_schedules

    env = read_environment()
    broker_url = args.broker or env.broker_url
    if not broker_url.startswith(_REDIS_SCHEMES):
        raise UsageError(
            "beat keeps its schedule state in Redis: the broker must be a redis:// or rediss:// URL"
        )
    roots = args.adapter_roots or list(env.adapter_roots)
    return load_schedules(args.schedule, adapter_roots=roots), broker_url


def _redis(broker_url: str) -> redis.Redis:
    import redis

    return redis.Redis.from_url(broker_url, socket_connect_timeout=_CONNECT_TIMEOUT_S, decode_responses=True)


def _unreachable(command: str, broker_url: str, error: Exception) -> int:
    from producer.redact import redact

    print(f"omni-batch {command}: Redis at {redact(broker_url)} is unavailable: {error}", file=sys.stderr)
    return EXIT_FAILURE


def _beat(args: argparse.Namespace) -> int:
    import redis

    from producer.beat import make_beat_app

    schedules, broker_url = _load(args)
    try:
        with _redis(broker_url) as client:
            client.ping()  # fail now, not inside Celery's start-up
    except redis.RedisError as e:
        return _unreachable("beat", broker_url, e)
    app = make_beat_app(schedules, broker_url=broker_url, max_interval=args.max_interval)
    try:
        app.Beat(loglevel=args.loglevel, max_interval=args.max_interval, remote_control=False).run()
    except Exception as e:
        print(f"omni-batch beat: stopped: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def schedule_rows(schedules: list[Schedule], client: redis.Redis, now: datetime) -> list[dict[str, Any]]:
    """Each schedule with its next run (from its trigger) and its last run (from Redis)."""
    from producer.run_ledger import RunLedger

    ledger = RunLedger(client)
    rows = []
    for schedule in schedules:
        last = ledger.last_run(schedule.name)
        next_at = schedule.trigger.next_after(now)
        rows.append(
            {
                "name": schedule.name,
                "trigger": schedule.trigger.as_dict(),
                "jobs": len(schedule.templates),
                "job_source": schedule.job_source,
                "output": schedule.output,
                "priority": schedule.priority,
                "next_run": _iso(next_at),
                "next_dataset": schedule.dataset(next_at),
                "last_run": None
                if last is None
                else {
                    "dataset": last.dataset,
                    "scheduled_at": last.scheduled_at,
                    "jobs": last.jobs,
                    "sent_at": last.sent_at,
                },
            }
        )
    return rows


def _list(args: argparse.Namespace) -> int:
    import redis

    schedules, broker_url = _load(args)
    try:
        with _redis(broker_url) as client:
            rows = schedule_rows(schedules, client, datetime.now(UTC))
            beat_running = bool(client.exists(d.BEAT_LOCK_KEY))
    except redis.RedisError as e:
        return _unreachable("schedule list", broker_url, e)
    if args.json:
        print(json.dumps({"beat_running": beat_running, "schedules": rows}, indent=2))
        return EXIT_OK
    print("a beat is running (it holds the lock)" if beat_running else "no beat is running")
    for row, schedule in zip(rows, schedules, strict=True):
        last = row["last_run"]
        last_text = (
            "never" if last is None else f"{last['dataset']} ({last['jobs']} jobs, sent {last['sent_at']})"
        )
        source = f"{row['jobs']} jobs from {row['job_source']}"
        print(f"{row['name']}: {schedule.trigger.describe()}, {source} to {row['output']}")
        print(f"  next: {row['next_dataset']} at {row['next_run']}")
        print(f"  last: {last_text}")
    return EXIT_OK


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds in 0.1..3600")
    return seconds


def register_beat(subparsers: argparse._SubParsersAction) -> None:
    """Add the `beat` command (entry point `omni_batch.commands:beat`)."""
    parser = subparsers.add_parser(
        "beat",
        help="send the runs of a schedules file as datasets, as they fall due",
        description="Run Celery beat over a schedules file: each run of a schedule is sent as its own "
        "dataset, NAME-<UTC time>. The schedule's state lives in Redis with a lock: one beat sends at a "
        "time, and a restarted beat never sends a run twice. A bad file is refused whole (exit 2).",
    )
    _add_common(parser)
    parser.add_argument(
        "--max-interval",
        metavar="S",
        type=_seconds,
        default=DEFAULT_MAX_INTERVAL_S,
        help="seconds between two looks at the schedule; a beat that dies holds the lock "
        f"5 x this long (default: {DEFAULT_MAX_INTERVAL_S:g})",
    )
    parser.add_argument(
        "--loglevel",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="what beat logs: " + ", ".join(LOG_LEVELS) + " (default: INFO)",
    )
    parser.set_defaults(handler=_beat)


def register_schedule(subparsers: argparse._SubParsersAction) -> None:
    """Add the `schedule` command (entry point `omni_batch.commands:schedule`)."""
    parser = subparsers.add_parser("schedule", help="show the schedules of a schedules file")
    commands = parser.add_subparsers(dest="schedule_command", required=True, metavar="COMMAND")
    listing = commands.add_parser(
        "list",
        help="each schedule's next and last run",
        description="Check the schedules file and show each schedule's next run and its last run "
        "(recorded in Redis by beat).",
    )
    _add_common(listing)
    listing.add_argument("--json", action="store_true", help="print one JSON object instead")
    listing.set_defaults(handler=_list)
