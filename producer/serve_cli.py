"""`omni-batch serve`: the HTTP API (FastAPI on uvicorn), for backends in any language.

Needs the `api` extra. Without a token in $OMNI_API_TOKENS it listens on loopback only.
"""

from __future__ import annotations

import argparse
import json
import sys

from producer import defaults as d
from producer.cli import EXIT_OK
from producer.errors import UsageError
from producer.http.config import (
    DEFAULT_HOST,
    DEFAULT_IMAGES_DATASET,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_JOBS,
    DEFAULT_PORT,
    DEFAULT_WAIT_S,
    MAX_WAIT_S,
)
from producer.settings import ENV_ADAPTER_ROOTS, ENV_API_TOKENS, ENV_BROKER_URL, ENV_OUTPUT_URI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` command (entry point `omni_batch.commands:serve`)."""
    parser = subparsers.add_parser(
        "serve",
        help="serve the HTTP API: submit jobs, read outcomes, OpenAI-style image generation",
        description=f"Serve the HTTP API. Bearer tokens come from ${ENV_API_TOKENS} (comma-separated); "
        "without one, only a loopback address may be bound.",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default: {DEFAULT_PORT})")
    parser.add_argument(
        "--broker",
        metavar="URL",
        help=f"broker URL (default: ${ENV_BROKER_URL}, else {d.DEFAULT_BROKER_URL})",
    )
    parser.add_argument(
        "--out",
        metavar="URI",
        help=f"the workers' output root, where outcomes are read (default: ${ENV_OUTPUT_URI})",
    )
    parser.add_argument(
        "--adapter-root",
        metavar="DIR",
        action="append",
        dest="adapter_roots",
        help="the workers' adapter roots, to turn a `lora.local_path` into an adapter name "
        f"(default: ${ENV_ADAPTER_ROOTS})",
    )
    parser.add_argument(
        "--images-dataset",
        metavar="D",
        default=DEFAULT_IMAGES_DATASET,
        help=f"dataset of /v1/images/generations jobs (default: {DEFAULT_IMAGES_DATASET})",
    )
    parser.add_argument(
        "--wait",
        metavar="S",
        type=float,
        default=DEFAULT_WAIT_S,
        help=f"seconds /v1/images/generations waits before answering 202 (default: {DEFAULT_WAIT_S:g}, "
        f"at most {MAX_WAIT_S:g}; a request may ask with `Prefer: wait=N`)",
    )
    parser.add_argument(
        "--max-body-bytes",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--max-jobs",
        metavar="N",
        type=int,
        default=DEFAULT_MAX_JOBS,
        help=f"most jobs in one POST /v1/jobs (default: {DEFAULT_MAX_JOBS})",
    )
    parser.add_argument(
        "--openapi", action="store_true", help="print the OpenAPI document (JSON) and exit, serving nothing"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Check the settings, then serve until interrupted. Bad settings: UsageError (exit 2)."""
    try:
        import uvicorn

        from producer.http import ApiConfig, create_app
        from producer.http.config import check_bind
    except ImportError as e:
        raise UsageError(
            f"'omni-batch serve' needs the api extra ({e.name} is missing): pip install 'omni-batch[api]'"
        ) from e
    from producer.errors import JobValidationError
    from producer.schema import validate_job
    from producer.settings import read_environment

    env = read_environment()
    output_uri = args.out or env.output_uri
    if args.openapi:
        # The document does not depend on the settings: any will do.
        app = create_app(ApiConfig(broker_url=env.broker_url, output_uri=output_uri or "."))
        json.dump(app.openapi(), sys.stdout, indent=2, sort_keys=True)
        print()
        return EXIT_OK
    if not output_uri:
        raise UsageError(f"no output location: pass --out URI or set {ENV_OUTPUT_URI} (the workers' output)")
    try:
        validate_job(
            {"prompt": "-", "dataset": args.images_dataset, "output": output_uri}
        )  # the names' rules
    except JobValidationError as e:
        raise UsageError(f"bad --images-dataset or output: {e}") from e
    config = ApiConfig(
        broker_url=args.broker or env.broker_url,
        output_uri=output_uri,
        adapter_roots=tuple(args.adapter_roots or env.adapter_roots),
        tokens=env.api_tokens,
        images_dataset=args.images_dataset,
        max_body_bytes=args.max_body_bytes,
        max_jobs=args.max_jobs,
        wait_s=args.wait,
    )
    check_bind(args.host, config)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info")
    return EXIT_OK
