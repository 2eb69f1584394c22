"""The worker's settings, read once from the environment (CONTRACT section 6); flags override."""

from __future__ import annotations

import os
from dataclasses import dataclass

from producer import defaults as d
from worker.scheduler import DEFAULT_MAX_BATCH

DEFAULT_MODEL = "tiny-sd3"
DEFAULT_WINDOW = 64
DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_CPU_LORAS = 16
# Longer than the scheduler's own default: a full 64-job window under load holds a job for about
# window x seconds-per-job, and a shorter max wait turns grouping back into deadline order
# (bench/scheduler.py --max-wait).
DEFAULT_MAX_WAIT_S = 900.0
# Redis redelivers a reserved, unacked job after this long. It must exceed the longest a job can
# sit in the window (a priority-0 job waits up to 2 x max wait) plus a group's run and upload, or a
# slow job would run twice (harmless, outputs are idempotent, but wasted).
DEFAULT_VISIBILITY_TIMEOUT_S = 7200
# The worker runs a group once no new job has arrived for this long (or the window is full).
DEFAULT_IDLE_S = 0.2
# Storing a result: attempts when the storage is unreachable, and the first backoff (doubling).
DEFAULT_STORE_ATTEMPTS = 6
DEFAULT_STORE_BACKOFF_S = 0.5
# Starts of one job that may end with the worker dead before it is failed as poison.
DEFAULT_MAX_ATTEMPTS = 3


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class WorkerSettings:
    model: str = DEFAULT_MODEL
    adapter_roots: tuple[str, ...] = ()
    max_loras: int = DEFAULT_MAX_LORAS
    max_cpu_loras: int = DEFAULT_MAX_CPU_LORAS
    window: int = DEFAULT_WINDOW
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    output_uri: str | None = None
    s3_endpoint_url: str | None = None
    broker_url: str = d.DEFAULT_BROKER_URL
    result_backend: str | None = None
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    idle_s: float = DEFAULT_IDLE_S
    store_attempts: int = DEFAULT_STORE_ATTEMPTS
    store_backoff_s: float = DEFAULT_STORE_BACKOFF_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    @classmethod
    def from_env(cls, **overrides: object) -> WorkerSettings:
        """Environment first, then every override that is not None (a flag the user gave)."""
        roots = os.environ.get(d.ENV_ADAPTER_ROOTS, "")
        values: dict[str, object] = {
            "model": os.environ.get(d.ENV_MODEL) or DEFAULT_MODEL,
            "adapter_roots": tuple(r for r in roots.split(os.pathsep) if r),
            "max_loras": _int_env(d.ENV_MAX_LORAS, DEFAULT_MAX_LORAS),
            "max_cpu_loras": _int_env(d.ENV_MAX_CPU_LORAS, DEFAULT_MAX_CPU_LORAS),
            "window": _int_env(d.ENV_WINDOW, DEFAULT_WINDOW),
            "output_uri": os.environ.get(d.ENV_OUTPUT_URI) or None,
            "s3_endpoint_url": os.environ.get(d.ENV_S3_ENDPOINT_URL) or None,
            "broker_url": os.environ.get(d.ENV_BROKER_URL) or d.DEFAULT_BROKER_URL,
            "result_backend": os.environ.get(d.ENV_RESULT_BACKEND) or None,
            "visibility_timeout_s": _int_env(d.ENV_VISIBILITY_TIMEOUT, DEFAULT_VISIBILITY_TIMEOUT_S),
            "max_attempts": _int_env(d.ENV_MAX_ATTEMPTS, DEFAULT_MAX_ATTEMPTS),
            "max_batch": _int_env(d.ENV_MAX_BATCH, DEFAULT_MAX_BATCH),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["window"] < 1:
            raise ValueError(f"the window must hold at least one job, got {values['window']}")
        return cls(**values)
