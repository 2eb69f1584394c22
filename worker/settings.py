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
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["window"] < 1:
            raise ValueError(f"the window must hold at least one job, got {values['window']}")
        return cls(**values)
