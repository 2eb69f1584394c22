"""Read and check adapters on a background thread, before the call that needs them.

While one group denoises, the worker's window already shows which adapters come next. Reading
and checking one (file I/O, hashing, parsing, copying into pinned memory) needs no model, so it
runs beside the denoiser; the call that then needs the adapter finds it read and waits for
nothing. A read made ahead of time is still a read of the adapter's files: the call that uses it
reports `adapter_source="disk"`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from omni_engine.lora.adapter import LoRAAdapter
from omni_engine.lora.request import LoRARequest

logger = logging.getLogger("omni.engine")


class Prefetcher:
    """Reads wanted adapters one at a time, oldest wish first; keeps at most `capacity` of them.

    `read` must not touch the model or any state the generating thread uses.
    """

    def __init__(self, read: Callable[[LoRARequest], LoRAAdapter], *, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._read = read
        self._capacity = capacity
        self._reads: OrderedDict[str, Future[LoRAAdapter]] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omni-prefetch")
        _one_torch_thread(self._executor)

    def want(self, requests: Iterable[LoRARequest]) -> None:
        """Start reading these adapters (most wanted first); older wishes beyond capacity are dropped."""
        requests = list(requests)
        for request in requests:  # submitted in order, so the most wanted is read first
            if request.lora_path not in self._reads:
                self._reads[request.lora_path] = self._executor.submit(self._read_quietly, request)
        for request in reversed(requests):
            self._reads.move_to_end(request.lora_path, last=False)
        while len(self._reads) > self._capacity:
            _, dropped = self._reads.popitem()
            dropped.cancel()  # not started yet: never read; started: its result is let go

    def take(self, lora_path: str) -> Future[LoRAAdapter] | None:
        """The read started for this path, if any; the caller owns it from now on."""
        return self._reads.pop(lora_path, None)

    def pending(self) -> list[str]:
        return list(self._reads)

    def join(self, timeout: float | None = None) -> None:
        """Wait until every read started so far has ended (read, failed or cancelled)."""
        futures.wait(list(self._reads.values()), timeout=timeout)

    def close(self) -> None:
        for read in self._reads.values():
            read.cancel()
        self._reads.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _read_quietly(self, request: LoRARequest) -> LoRAAdapter:
        try:
            return self._read(request)
        except Exception as e:
            # The call that needs the adapter reads it again and reports the error then.
            logger.debug("prefetching adapter %r failed: %s", request.lora_name, e)
            raise


def _one_torch_thread(executor: ThreadPoolExecutor) -> None:
    """Run the executor's tensor checks on one torch thread. With OpenMP the thread count is per
    thread, and a team of its own there would take the cores from the denoiser's team mid-step: on
    a 2-core CPU that cost the mixed workload 4-5% of its wall time, for 0.4 s of reads."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return
    threads = torch.get_num_threads()
    executor.submit(_use_one_thread).result()
    # torch.set_num_threads also sets the count that a thread takes when it first uses torch.
    torch.set_num_threads(threads)


def _use_one_thread() -> None:
    torch.get_num_threads()  # this thread's first use: it takes the shared count now, not later
    torch.set_num_threads(1)
