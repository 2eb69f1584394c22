"""The `omni-batch` command line.

The producer side owns the entry point because it is the plain install. Every subcommand,
its own included, registers through the `omni_batch.commands` entry-point group, so this
module never imports the engine or the worker: a command whose extra is not installed is
still listed and says what to install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "omni_batch.commands"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad usage or bad input: printed without a traceback, exit code 2."""


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
