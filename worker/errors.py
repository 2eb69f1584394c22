"""The worker's own failures (the engine's and the producer's have their own bases)."""

from __future__ import annotations

from omni_engine.errors import AdapterError


class WorkerError(Exception):
    """Base of the errors the worker records against a job."""


class SchedulingError(WorkerError, ValueError):
    """A scheduling policy or a pending job with a value the scheduler cannot use."""


class AttemptsUnavailableError(WorkerError):
    """The job start counts could not be read or written, so the poison bound cannot be kept:
    the jobs go back to the queue rather than run unbounded."""


class PoisonJobError(WorkerError):
    """The job was started again and again and never finished: each time, the worker died."""


class OutOfMemoryError(WorkerError):
    """The job does not fit in device memory even alone."""


class DeviceLostError(WorkerError):
    """The device failed in a way that leaves it unusable to this process (a CUDA error such as an
    illegal memory access or a device-side assert): every later call would fail too. Not the jobs'
    fault, so they are not failed: they go back to the queue and the process stops, for its
    supervisor to start a fresh one."""


class AdapterDownloadError(WorkerError, AdapterError):
    """An adapter in object storage could not be fetched whole and as listed (the transfer broke off,
    the bytes did not match the object's size or checksum, it changed meanwhile, or it cannot fit in
    the adapter cache). The job fails with this; nothing partial is kept, so the next job that needs
    the adapter fetches it again."""
