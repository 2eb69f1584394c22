"""The producer's exceptions: one base, so callers can catch everything the producer raises."""

from __future__ import annotations


class ProducerError(Exception):
    """Base of every error the producer raises on purpose."""


class UsageError(ProducerError):
    """Bad usage or bad input (a flag, a setting, a job file): the CLI prints it and exits 2."""


class SettingsError(UsageError, ValueError):
    """A setting (an environment variable or a flag) that cannot be used; the message names it."""


class JobFileError(UsageError, ValueError):
    """A job file with bad lines, or none. `problems` names each line and what is wrong with it."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)


class ScheduleFileError(UsageError, ValueError):
    """A schedules file that cannot be used. `problems` names, for each, the file's line and the entry."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)


class JobValidationError(ProducerError, ValueError):
    """A job breaks the schema. `problems` lists every violation, each naming field, value, reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class AdapterNameError(ProducerError, ValueError):
    """An adapter name that breaks the name rule, or that resolves outside its adapter root."""


class BrokerUnavailableError(ProducerError):
    """The broker could not be reached. The message names the URL with any password masked.

    `sent` jobs surely reached the broker and `uncertain` more may have (a pipelined chunk that
    failed part-way) out of `total`.
    """

    def __init__(
        self, safe_url: str, reason: str, *, sent: int = 0, uncertain: int = 0, total: int = 0
    ) -> None:
        self.safe_url = safe_url
        self.reason = reason
        self.sent = sent
        self.uncertain = uncertain
        self.total = total
        message = f"broker {safe_url} is unavailable: {reason}"
        if sent or uncertain:
            message += f" ({sent} of {total} jobs were sent"
            if uncertain:
                message += f", and up to {uncertain} more may have been"
            message += "; submitting them again is safe: a job's id is its idempotency key)"
        elif total:
            message += " (nothing was sent)"
        super().__init__(message)


class StorageError(ProducerError):
    """Reading or writing outputs failed for good (no such bucket, access denied, bad key): do not retry.

    Messages name the storage URI, the key and the reason, and never a credential.
    """


class StorageUnavailableError(StorageError):
    """The storage could not be reached or asked to back off (connection, timeout, 5xx, throttling).

    The only storage error worth retrying later.
    """


class InvalidStorageKeyError(StorageError, ValueError):
    """A key (or output name) that is not a plain relative path inside the storage root."""


class InvalidStorageURIError(StorageError, ValueError):
    """An output URI or S3 endpoint that cannot be used (unknown scheme, credentials in it, no bucket)."""


class OutputNotAllowedError(StorageError, ValueError):
    """A job's output outside the worker's own output and the roots its operator allows."""
