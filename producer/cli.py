"""The `omni-batch` command line: the entry point, and what its commands share.

The producer side owns the entry point because it is the plain install. Every subcommand,
its own included, registers through the `omni_batch.commands` entry-point group (one entry a
command), so this module never imports the engine or the worker: a command whose extra is not
installed is still listed and says what to install. Commands that read a job file (submit, run,
status, wait) take the same default flags through `add_job_default_flags` and `read_jobs`.
Heavy imports (celery, pydantic, torch) wait for a handler, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from producer import defaults as d
from producer.errors import UsageError
from producer.settings import ENV_OUTPUT_URI

if TYPE_CHECKING:
    from producer.jobfile import JobFile

ENTRY_POINT_GROUP = "omni_batch.commands"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


# Flags that give a default to lines lacking the field: (field, type, help).
JOB_DEFAULT_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("dataset", str, f"dataset name (schema default: {d.DEFAULT_DATASET})"),
    ("adapter", str, "adapter name under the worker's adapter roots (schema default: none, the base model)"),
    ("scale", float, "adapter scale, -8..8 (schema default: 1.0)"),
    ("steps", int, "inference steps, 1..200 (schema default: the model's)"),
    ("guidance_scale", float, "guidance scale, 0..50 (schema default: the model's)"),
    ("width", int, "image width, a multiple of 8 in 8..4096 (schema default: the model's)"),
    ("height", int, "image height, a multiple of 8 in 8..4096 (schema default: the model's)"),
    ("priority", int, f"0..9, 9 = most urgent (schema default: {d.DEFAULT_PRIORITY})"),
    ("output", str, f"s3://bucket/prefix or a directory (schema default: the worker's ${ENV_OUTPUT_URI})"),
)


def add_job_default_flags(parser: argparse.ArgumentParser, *, require_dataset: bool = False) -> None:
    """`--dataset`, `--adapter`, ...: defaults for lines that lack the field.

    Every command that reads a job file takes them all, since each field shapes a job's derived id:
    `status --scale 2` finds the jobs that `submit --scale 2` sent.
    """
    group = parser.add_argument_group("defaults for lines that lack the field")
    for field, kind, text in JOB_DEFAULT_FLAGS:
        flag = "--" + field.replace("_", "-")
        required = require_dataset and field == "dataset"
        group.add_argument(
            flag, dest=field, type=kind, metavar=field.split("_")[-1].upper(), help=text, required=required
        )


def job_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The default flags the user gave, checked as a job would be (UsageError if one is bad)."""
    from producer.errors import JobValidationError
    from producer.schema import validate_job

    defaults = {field: getattr(args, field) for field, _, _ in JOB_DEFAULT_FLAGS}
    defaults = {field: value for field, value in defaults.items() if value is not None}
    try:
        validate_job({"prompt": "-", **defaults})
    except JobValidationError as e:
        raise UsageError(f"bad default flag: {e}") from e
    return defaults


def read_jobs(args: argparse.Namespace, path: str, *, action: str) -> JobFile:
    """Every job of the file at `path` with the default flags applied (JobFileError if any is bad).

    A large file takes a while to validate: a bar shows it, and is cleared once it is read."""
    from producer.jobfile import STDIN, read_job_file
    from producer.progress import progress_bar

    defaults = job_defaults(args)
    name = "stdin" if path == STDIN else path
    with progress_bar(None, desc=f"reading {name}", unit="line", leave=False) as bar:

        def show(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        return read_job_file(path, defaults, action=action, on_progress=show)


def _missing_extra(name: str, error: ImportError) -> Callable[[argparse._SubParsersAction], None]:
    def register(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser(name, help=f"(unavailable: {error.name} is not installed)")
        parser.add_argument("rest", nargs=argparse.REMAINDER)

        def handler(_: argparse.Namespace) -> int:
            raise UsageError(
                f"'omni-batch {name}' needs the worker extra ({error.name} is missing): "
                "pip install 'omni-batch[worker]'"
            )

        parser.set_defaults(handler=handler)

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omni-batch", description="Bulk image generation with many LoRA adapters."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:
            register = _missing_extra(ep.name, e)
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as e:
        print(f"omni-batch {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:
        # A command whose registration is light but whose work needs the worker extra.
        print(
            f"omni-batch {args.command}: needs {e.name}, which is not installed: "
            "pip install 'omni-batch[worker]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
