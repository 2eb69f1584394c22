"""Why loading an adapter into the model failed: the adapter's own fault, or anything else.

Only the adapter's faults may become AdapterError: a caller fails those jobs for good, while out of
memory or a device error must reach it unchanged, so that it can split the batch or retry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from omni_engine.device_errors import error_chain, out_of_memory
from omni_engine.errors import AdapterError

logger = logging.getLogger("omni.engine")

# What PEFT and diffusers raise when they refuse an adapter's config or keys.
ADAPTER_FAULTS = (ValueError, TypeError, KeyError, IndexError)
# diffusers logs an ERROR from here for every load it rolls back.
DIFFUSERS_LOADER_LOGGER = "diffusers.loaders.peft"


def adapter_fault(error: BaseException, name: str | None = None) -> BaseException:
    """The adapter's own fault behind a failed load (of model adapter `name`, when diffusers loaded
    it), to report as an AdapterError; any other failure is raised from here, the memory error
    itself where there is one.

    A fault is an error of ADAPTER_FAULTS raised from (or while handling) nothing but such errors:
    a ValueError raised from an out-of-memory error is out of memory.
    """
    real = _unmasked(error, name)
    chain = error_chain(real)
    memory = out_of_memory(real)
    if memory is None and all(isinstance(e, ADAPTER_FAULTS) for e in chain):
        return real
    failure = memory or real
    if failure is error:
        raise error
    raise failure from None


def log_refusal(adapter: str, path: str, error: AdapterError) -> None:
    """The one line an adapter refused by the engine is reported in (the error itself is raised)."""
    logger.warning("refused adapter %r (%s): %s: %s", adapter, path, type(error).__name__, error.reason)


@contextlib.contextmanager
def quiet_rollback(name: str) -> Iterator[None]:
    """Drop diffusers' ERROR line for a failed load of `name`: the failure is raised, and reported once."""
    loader_logger = logging.getLogger(DIFFUSERS_LOADER_LOGGER)
    drop = _DropRollbackError(name)
    loader_logger.addFilter(drop)
    try:
        yield
    finally:
        loader_logger.removeFilter(drop)


class _DropRollbackError(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self._marker = f" {name} was unsuccessful"

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and self._marker in record.getMessage())


def _unmasked(error: BaseException, name: str) -> BaseException:
    """The failure itself, not diffusers' cleanup failing on it.

    When PEFT fails before registering the adapter, diffusers' rollback (`peft_config.pop(name)`)
    raises KeyError(name) while handling the real error, which becomes its context.
    """
    while name is not None and isinstance(error, KeyError) and error.args == (name,) and error.__context__:
        error = error.__context__
    return error
