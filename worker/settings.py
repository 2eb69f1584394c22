"""The worker's settings: its defaults, then the environment (`producer.settings`), then flags.

The embedded runner (`omni-batch run`, `demo`) and the Celery worker take the same settings, so
they build the same engine (`build_engine`) and the same scheduling policy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omni_engine.defaults import DEFAULT_MAX_CPU_LORAS, DEFAULT_MAX_LORAS
from omni_engine.lora.fuse_mode import FuseMode
from omni_engine.models.presets import DEFAULT_MODEL
from producer.adapter_roots import is_remote
from producer.broker import BrokerKind, broker_kind
from producer.defaults import DEFAULT_BROKER_URL
from producer.errors import InvalidStorageURIError, SettingsError
from producer.output_uri import parse_output_uri
from producer.settings import (
    ENV_ADAPTER_CACHE_BYTES,
    ENV_ADAPTER_ROOTS,
    ENV_BROKER_HEARTBEAT,
    ENV_COMPILE,
    ENV_FUSE,
    ENV_METRICS_PORT,
    ENV_MIX_ADAPTERS,
    ENV_OUTPUT_ROOTS,
    ENV_STUCK_AFTER,
    ENV_SUMMARY_INTERVAL,
    cache_dir,
    read_environment,
)
from worker.scheduler import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_S, SchedulerPolicy

if TYPE_CHECKING:
    import torch

    from omni_engine import Omni

DEFAULT_WINDOW = 64
# Adapters one pipeline call may mix, when it has room left after its own adapter's jobs (never
# more than max_loras; a compiled denoiser never mixes), on a GPU. On a CPU a call of eight images
# costs what two calls of four do, so a fuller call saves nothing and its unfused rows cost: there
# the default is 1 (docs/performance.md, "When mixing pays").
DEFAULT_MIX_ADAPTERS = DEFAULT_MAX_LORAS
# Redis redelivers a reserved job whose lease has not been renewed for this long. A live worker
# renews the lease of every job it holds (worker.leases), however long the job waits, so this is
# only how soon a dead worker's jobs come back; it must stay well above a renewal's worst delay.
DEFAULT_VISIBILITY_TIMEOUT_S = 60
# Far above any one pipeline call (minutes for a batch of a large model): a consumer silent this
# long is stuck (a deadlock, a hung device or socket), not busy.
DEFAULT_STUCK_AFTER_S = 1800
# RabbitMQ: the AMQP heartbeat timeout the worker asks for (the server's own, 60 s by default,
# caps it). A worker whose host vanished without closing its connection is taken for dead, and
# its jobs returned, after about this long; a live worker's heartbeats go on while a group runs
# (worker.keepalive).
DEFAULT_BROKER_HEARTBEAT_S = 60
# The worker runs a group once no new job has arrived for this long (or the window is full).
DEFAULT_IDLE_S = 0.2
# Storing a result: attempts when the storage is unreachable, and the first backoff (doubling).
DEFAULT_STORE_ATTEMPTS = 6
DEFAULT_STORE_BACKOFF_S = 0.5
# Starts of one job that may end with the worker dead before it is failed as poison.
DEFAULT_MAX_ATTEMPTS = 3
# Prometheus metrics are off unless a port is given: workers sharing a host (one per GPU) each
# need their own, so no single default would do.
DEFAULT_METRICS_PORT = 0
# Seconds between two summary lines in the worker's log (0: none).
DEFAULT_SUMMARY_INTERVAL_S = 60.0
# Bytes of adapters fetched from object storage kept on local disk (least recently used go first).
DEFAULT_ADAPTER_CACHE_BYTES = 20 * 1024**3
_MAX_PORT = 65535


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    model: str = DEFAULT_MODEL
    # Directories and s3://bucket/prefix; an adapter under an s3:// root is fetched into the cache.
    adapter_roots: tuple[str, ...] = ()
    adapter_cache_dir: str | None = None  # None: <OMNI_CACHE_DIR>/adapters
    adapter_cache_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES
    max_loras: int = DEFAULT_MAX_LORAS
    max_cpu_loras: int = DEFAULT_MAX_CPU_LORAS
    window: int = DEFAULT_WINDOW
    max_batch: int = DEFAULT_MAX_BATCH
    mix_adapters: int | None = None  # None: by the engine's device (see `policy_on`)
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    output_uri: str | None = None
    # Where jobs may write besides output_uri (OMNI_OUTPUT_ROOTS); see `allowed_outputs`.
    output_roots: tuple[str, ...] = ()
    s3_endpoint_url: str | None = None
    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str | None = None
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    # A consumer silent this long is taken for hung: its leases lapse, it leaves the fleet (0: never).
    stuck_after_s: int = DEFAULT_STUCK_AFTER_S
    broker_heartbeat_s: int = DEFAULT_BROKER_HEARTBEAT_S  # RabbitMQ only; 0: none
    idle_s: float = DEFAULT_IDLE_S
    store_attempts: int = DEFAULT_STORE_ATTEMPTS
    store_backoff_s: float = DEFAULT_STORE_BACKOFF_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    fuse: FuseMode = FuseMode.AUTO
    metrics_port: int = DEFAULT_METRICS_PORT
    summary_interval_s: float = DEFAULT_SUMMARY_INTERVAL_S
    task_events: bool = True
    compile: str | None = None  # a torch.compile backend; None: not compiled
    # Adapter affinity across a fleet (worker.fleet), on a Redis broker; RabbitMQ has none.
    affinity: bool = True

    def __post_init__(self) -> None:
        if self.window < 1:
            raise SettingsError(f"the window must hold at least one job, got {self.window}")
        if self.mix_adapters is not None and self.mix_adapters < 1:
            raise SettingsError(
                f"adapters per call (${ENV_MIX_ADAPTERS}, --mix-adapters) must be 1 (never mix) or more, "
                f"got {self.mix_adapters}"
            )
        if not 0 <= self.metrics_port <= _MAX_PORT:
            raise SettingsError(
                f"the metrics port (${ENV_METRICS_PORT}, --metrics-port) must be 0 (off) to {_MAX_PORT}, "
                f"got {self.metrics_port}"
            )
        if self.stuck_after_s < 0:
            raise SettingsError(
                f"the hung-consumer limit (${ENV_STUCK_AFTER}, --stuck-after) must be 0 (never) or a number "
                f"of seconds, got {self.stuck_after_s}"
            )
        if self.broker_heartbeat_s < 0:
            raise SettingsError(
                f"the broker heartbeat (${ENV_BROKER_HEARTBEAT}, --broker-heartbeat) must be 0 (none) or a "
                f"number of seconds, got {self.broker_heartbeat_s}"
            )
        if not 0 <= self.summary_interval_s < float("inf"):
            raise SettingsError(
                f"the summary interval (${ENV_SUMMARY_INTERVAL}, --summary-interval) must be 0 (off) or "
                f"a number of seconds, got {self.summary_interval_s}"
            )
        for root in self.output_roots:
            try:
                parse_output_uri(root)
            except InvalidStorageURIError as e:
                raise SettingsError(f"${ENV_OUTPUT_ROOTS}: {e}") from None
        for root in self.adapter_roots:
            if "://" not in root:
                continue  # a directory
            if not is_remote(root):
                raise SettingsError(
                    f"adapter root {root!r} (${ENV_ADAPTER_ROOTS}, --adapter-root): "
                    "give a directory or s3://bucket/prefix"
                )
            try:
                parse_output_uri(root)
            except InvalidStorageURIError as e:
                raise SettingsError(f"${ENV_ADAPTER_ROOTS}: {e}") from None
        if self.adapter_cache_bytes < 1:
            raise SettingsError(
                f"the adapter cache size (${ENV_ADAPTER_CACHE_BYTES}, --adapter-cache-bytes) must be a "
                f"positive number of bytes, got {self.adapter_cache_bytes}"
            )
        try:
            object.__setattr__(self, "fuse", FuseMode(self.fuse))
        except ValueError:
            modes = ", ".join(m.value for m in FuseMode)
            raise SettingsError(
                f"fuse (${ENV_FUSE}, --fuse) must be one of {modes}, got {self.fuse!r}"
            ) from None
        if self.compile is not None:
            from omni_engine.compiling import check_compile_backend, check_kernel_compiler
            from omni_engine.models.loader import resolve_device

            try:
                check_compile_backend(self.compile)
                check_kernel_compiler(self.compile, resolve_device(None, None)[0])  # the engine's device
            except ValueError as e:
                raise SettingsError(f"${ENV_COMPILE}, --compile: {e}") from None

    @classmethod
    def from_env(cls, **overrides: object) -> WorkerSettings:
        """Environment first, then every override that is not None (a flag the user gave)."""
        env = read_environment()
        values: dict[str, object] = {
            "model": env.model,
            "adapter_roots": env.adapter_roots or None,
            "adapter_cache_dir": env.adapter_cache_dir,
            "adapter_cache_bytes": env.adapter_cache_bytes,
            "max_loras": env.max_loras,
            "max_cpu_loras": env.max_cpu_loras,
            "window": env.window,
            "output_uri": env.output_uri,
            "output_roots": env.output_roots or None,
            "s3_endpoint_url": env.s3_endpoint_url,
            "broker_url": env.broker_url,
            "result_backend": env.result_backend,
            "visibility_timeout_s": env.visibility_timeout_s,
            "stuck_after_s": env.stuck_after_s,
            "broker_heartbeat_s": env.broker_heartbeat_s,
            "max_attempts": env.max_attempts,
            "max_batch": env.max_batch,
            "mix_adapters": env.mix_adapters,
            "fuse": env.fuse,
            "metrics_port": env.metrics_port,
            "summary_interval_s": env.summary_interval_s,
            "task_events": env.task_events,
            "compile": env.compile,
            "affinity": env.affinity,
        }
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**{name: value for name, value in values.items() if value is not None})

    @property
    def allowed_outputs(self) -> tuple[str, ...]:
        """The worker's own output and the roots its operator allows: the only places it writes."""
        own = (self.output_uri,) if self.output_uri else ()
        return tuple(dict.fromkeys([*own, *self.output_roots]))

    @property
    def adapter_cache_path(self) -> str:
        """Where adapters from s3:// roots are fetched to: absolute, as the engine's roots compare it."""
        path = self.adapter_cache_dir or os.path.join(cache_dir(), "adapters")
        return os.path.abspath(os.path.expanduser(path))

    @property
    def has_remote_adapter_roots(self) -> bool:
        """Whether any adapter root is in object storage (so adapters are fetched into the cache)."""
        return any(is_remote(root) for root in self.adapter_roots)

    @property
    def engine_adapter_roots(self) -> list[str]:
        """What the engine may read adapters from: the local roots, and the cache when it is used."""
        local = [root for root in self.adapter_roots if not is_remote(root)]
        return [*local, self.adapter_cache_path] if self.has_remote_adapter_roots else local

    @property
    def follows_fleet(self) -> bool:
        """Whether this worker takes part in adapter affinity: asked for, and on a Redis broker."""
        return self.affinity and self.meets_fleet

    @property
    def meets_fleet(self) -> bool:
        """Whether shard queues can exist on this worker's broker (Redis), whatever it asked for."""
        return broker_kind(self.broker_url) is BrokerKind.REDIS

    def policy_on(self, device: torch.device) -> SchedulerPolicy:
        """The scheduling policy these settings ask for, for an engine on `device`."""
        mix = self.mix_adapters
        if mix is None:
            mix = 1 if device.type == "cpu" else DEFAULT_MIX_ADAPTERS
        # The engine mixes at most max_loras adapters in a call, and none on a compiled denoiser.
        mix = 1 if self.compile is not None else min(mix, self.max_loras)
        return SchedulerPolicy(max_batch=self.max_batch, max_wait_s=self.max_wait_s, mix_adapters=mix)


def build_engine(settings: WorkerSettings) -> Omni:
    """The engine a worker or the embedded runner serves jobs with (loads the model: seconds)."""
    from omni_engine import Omni

    return Omni(
        settings.model,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        adapter_roots=settings.engine_adapter_roots,
        fuse=settings.fuse,
        compile=settings.compile,
    )
