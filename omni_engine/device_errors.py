"""What a failed call's error says about the device: out of memory (a smaller batch may fit), or
lost to this process (every later call would fail too), as against the call's own fault.

One home for the three callers that must agree: an adapter's load (only its own faults become
AdapterError), the worker's group (split, stop, or fail the jobs) and the embedded runner.
"""

from __future__ import annotations

import torch

# What a failed allocation's RuntimeError says: cuBLAS's and cuDNN's, CUDA's own (pinned host
# memory), and the host allocator's.
OUT_OF_MEMORY_MARKERS = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "can't allocate memory",
)
# What a RuntimeError from a failed kernel says, on torch before AcceleratorError (2.8) and from
# Triton's (compiled) kernels.
DEVICE_ERROR_MARKERS = ("CUDA error", "Triton Error [CUDA]")


def error_chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def out_of_memory(error: BaseException) -> BaseException | None:
    """The allocation failure behind `error` (itself, or one it was raised from), if any."""
    for cause in error_chain(error):
        if isinstance(cause, (torch.OutOfMemoryError, MemoryError)):
            return cause
        if isinstance(cause, RuntimeError) and any(m in str(cause) for m in OUT_OF_MEMORY_MARKERS):
            return cause
    return None


def device_lost(error: BaseException, device: torch.device) -> bool:
    """Whether the device is unusable to this process after `error`: a CUDA error other than out of
    memory behind it, or, on a GPU, a device that fails to synchronise (the error did not say so)."""
    if out_of_memory(error) is not None:
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    for cause in error_chain(error):
        if isinstance(cause, accelerator_error):
            return True
        if isinstance(cause, RuntimeError) and any(m in str(cause) for m in DEVICE_ERROR_MARKERS):
            return True
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
    except Exception:  # a sticky error: the context is gone
        return True
    return False


def drop_frames(error: BaseException) -> BaseException:
    """`error` without its tracebacks, nor those of every error behind it: they hold the failed
    call's frames, and with them its tensors (on a GPU, the memory a retry needs)."""
    stack, seen = [error], []
    while stack:
        current = stack.pop()
        if any(current is done for done in seen):
            continue
        seen.append(current)
        current.__traceback__ = None
        stack.extend(linked for linked in (current.__cause__, current.__context__) if linked is not None)
    return error
