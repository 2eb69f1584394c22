"""The environment, read in one place: every `OMNI_*` variable omni-batch understands.

Flags win over the environment, and the environment over each reader's own defaults, so this
module only says what is set: `None` (or `()`) where a variable is unset or empty. The producer
fills in its broker default here, and `cache_dir` the host's cache, which the model presets and the
worker's adapter cache share; the worker (`worker.settings`) and the engine's command line apply
their own defaults to what is left unset. Nothing else in the tree reads `os.environ`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from producer.defaults import DEFAULT_BROKER_URL
from producer.errors import SettingsError

ENV_BROKER_URL = "OMNI_BROKER_URL"
ENV_RESULT_BACKEND = "OMNI_RESULT_BACKEND"
ENV_OUTPUT_URI = "OMNI_OUTPUT_URI"
ENV_S3_ENDPOINT_URL = "OMNI_S3_ENDPOINT_URL"
ENV_MODEL = "OMNI_MODEL"
ENV_ADAPTER_ROOTS = "OMNI_ADAPTER_ROOTS"
ENV_MAX_LORAS = "OMNI_MAX_LORAS"
ENV_MAX_CPU_LORAS = "OMNI_MAX_CPU_LORAS"
ENV_VISIBILITY_TIMEOUT = "OMNI_VISIBILITY_TIMEOUT"
ENV_WINDOW = "OMNI_WINDOW"
ENV_MAX_ATTEMPTS = "OMNI_MAX_ATTEMPTS"
ENV_MAX_BATCH = "OMNI_MAX_BATCH"
ENV_MIX_ADAPTERS = "OMNI_MIX_ADAPTERS"
ENV_CACHE_DIR = "OMNI_CACHE_DIR"
ENV_FUSE = "OMNI_FUSE"
ENV_METRICS_PORT = "OMNI_METRICS_PORT"
ENV_SUMMARY_INTERVAL = "OMNI_SUMMARY_INTERVAL"
ENV_TASK_EVENTS = "OMNI_TASK_EVENTS"
_SWITCH = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
ENV_API_TOKENS = "OMNI_API_TOKENS"
ENV_COMPILE = "OMNI_COMPILE"
ENV_OUTPUT_ROOTS = "OMNI_OUTPUT_ROOTS"
ENV_ADAPTER_CACHE_DIR = "OMNI_ADAPTER_CACHE_DIR"
ENV_ADAPTER_CACHE_BYTES = "OMNI_ADAPTER_CACHE_BYTES"
ENV_AFFINITY = "OMNI_AFFINITY"
ENV_STUCK_AFTER = "OMNI_STUCK_AFTER"
ENV_BROKER_HEARTBEAT = "OMNI_BROKER_HEARTBEAT"
# A URI scheme inside an os.pathsep-separated list: `s3://b/p` splits at its own ':' on POSIX.
_SCHEME_WORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


@dataclass(frozen=True, kw_only=True)
class Environment:
    """What the `OMNI_*` variables say, typed. Unset: None, so the reader's own default applies."""

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str | None = None
    output_uri: str | None = None
    s3_endpoint_url: str | None = None
    model: str | None = None
    adapter_roots: tuple[str, ...] = ()
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    visibility_timeout_s: int | None = None
    stuck_after_s: int | None = None
    broker_heartbeat_s: int | None = None
    window: int | None = None
    max_attempts: int | None = None
    max_batch: int | None = None
    mix_adapters: int | None = None
    cache_dir: str | None = None
    fuse: str | None = None
    metrics_port: int | None = None
    summary_interval_s: int | None = None
    task_events: bool = True
    api_tokens: tuple[str, ...] = ()
    compile: str | None = None
    output_roots: tuple[str, ...] = ()
    adapter_cache_dir: str | None = None
    adapter_cache_bytes: int | None = None
    affinity: bool = True


def cache_dir(env: Environment | None = None) -> Path:
    """omni-batch's cache on this host ($OMNI_CACHE_DIR, else ~/.cache/omni-batch): built presets,
    and by default the adapters fetched from object storage."""
    env = env or read_environment()
    return Path(env.cache_dir or Path.home() / ".cache" / "omni-batch")


def split_roots(text: str) -> tuple[str, ...]:
    """An os.pathsep-separated list of directories and URIs (`s3://bucket/prefix`), in order.

    On POSIX the separator is ':', which every URI also holds: a piece that is a bare scheme name
    followed by one starting with '//' is one URI again.
    """
    pieces = text.split(os.pathsep)
    roots: list[str] = []
    i = 0
    while i < len(pieces):
        piece = pieces[i]
        if _SCHEME_WORD.fullmatch(piece) and i + 1 < len(pieces) and pieces[i + 1].startswith("//"):
            piece, i = f"{piece}:{pieces[i + 1]}", i + 1
        if piece:
            roots.append(piece)
        i += 1
    return tuple(roots)


def read_environment(environ: Mapping[str, str] | None = None) -> Environment:
    """The environment as it is now (`environ` defaults to `os.environ`).

    Read at each call, not once at import, so a process that sets a variable (a test, a launcher)
    is seen. A malformed number raises SettingsError naming the variable.
    """
    env = os.environ if environ is None else environ

    def text(name: str) -> str | None:
        return env.get(name) or None

    def integer(name: str) -> int | None:
        raw = text(name)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"${name} must be an integer, got {raw!r}") from None

    def switch(name: str, default: bool) -> bool:
        raw = text(name)
        if raw is None:
            return default
        if raw.lower() not in _SWITCH:
            raise SettingsError(f"${name} must be one of 1, 0, true, false, yes, no, on, off, got {raw!r}")
        return _SWITCH[raw.lower()]

    tokens = text(ENV_API_TOKENS) or ""
    return Environment(
        broker_url=text(ENV_BROKER_URL) or DEFAULT_BROKER_URL,
        result_backend=text(ENV_RESULT_BACKEND),
        output_uri=text(ENV_OUTPUT_URI),
        s3_endpoint_url=text(ENV_S3_ENDPOINT_URL),
        model=text(ENV_MODEL),
        adapter_roots=split_roots(text(ENV_ADAPTER_ROOTS) or ""),
        max_loras=integer(ENV_MAX_LORAS),
        max_cpu_loras=integer(ENV_MAX_CPU_LORAS),
        visibility_timeout_s=integer(ENV_VISIBILITY_TIMEOUT),
        stuck_after_s=integer(ENV_STUCK_AFTER),
        broker_heartbeat_s=integer(ENV_BROKER_HEARTBEAT),
        window=integer(ENV_WINDOW),
        max_attempts=integer(ENV_MAX_ATTEMPTS),
        max_batch=integer(ENV_MAX_BATCH),
        mix_adapters=integer(ENV_MIX_ADAPTERS),
        cache_dir=text(ENV_CACHE_DIR),
        fuse=text(ENV_FUSE),
        metrics_port=integer(ENV_METRICS_PORT),
        summary_interval_s=integer(ENV_SUMMARY_INTERVAL),
        task_events=switch(ENV_TASK_EVENTS, True),
        api_tokens=tuple(token.strip() for token in tokens.split(",") if token.strip()),
        compile=text(ENV_COMPILE),
        output_roots=split_roots(text(ENV_OUTPUT_ROOTS) or ""),
        adapter_cache_dir=text(ENV_ADAPTER_CACHE_DIR),
        adapter_cache_bytes=integer(ENV_ADAPTER_CACHE_BYTES),
        affinity=switch(ENV_AFFINITY, True),
    )
