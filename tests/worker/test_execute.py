"""A group's execution under faults: storage down (kept bytes, backoff), a batch out of memory, a
failed device."""

from __future__ import annotations

import json
import logging
import sys
import threading
from io import BytesIO

import boto3
import pytest
import torch
from fixtures.redis_server import free_port
from moto.server import ThreadedMotoServer
from PIL import Image
from prometheus_client import REGISTRY

from omni_engine import Omni
from producer import layout
from producer.errors import StorageUnavailableError
from producer.schema import validate_job
from producer.storage import open_storage
from worker.errors import DeviceLostError
from worker.execute import Result, WorkItem, generate_group, store_with_retry

# s3_server: the session's fake credentials; the servers here are the tests' own, to stop and start.


class _RetrySeen(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retry" in record.getMessage():
            self.seen.set()


def _result(storage) -> Result:
    job = validate_job({"prompt": "kept", "dataset": "ds"})
    return Result(
        WorkItem(job, None, storage), {"status": "ok", "timings": {}}, image=b"\x89PNG generated once"
    )


def test_a_result_is_stored_once_the_server_is_back(s3_server):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="comes-back")
    storage = open_storage("s3://comes-back/out", endpoint_url=endpoint)
    server.stop()

    result = _result(storage)
    handler = _RetrySeen()
    logging.getLogger("omni.worker").addHandler(handler)
    outcome: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(error=store_with_retry(result, attempts=10, backoff_s=0.2))
    )
    try:
        thread.start()
        assert handler.seen.wait(30), "no failed attempt while the server was down"
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)  # same port, same buckets
        server.start()
        thread.join(60)
    finally:
        logging.getLogger("omni.worker").removeHandler(handler)

    assert outcome["error"] is None
    job = result.item.job
    assert storage.get_bytes(layout.image_key(job.dataset, job.job_id)) == b"\x89PNG generated once"
    record = json.loads(storage.get_bytes(layout.sidecar_key(job.dataset, job.job_id)))
    assert record["status"] == "ok" and "store_s" in record["timings"]
    server.stop()


def test_the_retry_budget_ends_with_a_clear_error(s3_server):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    storage = open_storage("s3://never-there/out", endpoint_url=endpoint)
    retries_before = REGISTRY.get_sample_value("omni_storage_retries_total")
    error = store_with_retry(_result(storage), attempts=3, backoff_s=0.01)
    assert isinstance(error, StorageUnavailableError)
    assert "never-there" in str(error) or endpoint in str(error)
    # Three attempts, two retries: what an operator's storage-retry graph shows.
    assert REGISTRY.get_sample_value("omni_storage_retries_total") == retries_before + 2


# What a GPU raises when an allocation fails: torch's own error, and cuBLAS's as a RuntimeError.
OUT_OF_MEMORY = {
    "torch": lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"),
    "cublas": lambda: RuntimeError(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)` (simulated)"
    ),
}


@pytest.mark.parametrize("error", OUT_OF_MEMORY.values(), ids=OUT_OF_MEMORY.keys())
def test_a_batch_that_runs_out_of_memory_is_split_and_every_job_completes(tmp_path, error):
    # A GPU's out-of-memory error cannot happen on this CPU machine, so a forward hook raises the
    # very exception a GPU raises whenever the transformer sees more than one image (classifier-free
    # guidance doubles the batch).
    engine = Omni("tiny-sd3")
    storage = open_storage(str(tmp_path / "out"))
    items = [WorkItem(validate_job({"prompt": f"oom {i}", "dataset": "ds"}), None, storage) for i in range(4)]
    alone = [engine.generate(i.job.prompt, seed=i.job.seed)[0].images[0].tobytes() for i in items]
    handling = []

    def too_big(module, args, kwargs):
        if kwargs["hidden_states"].shape[0] > 2:
            raise error()
        # A retry made while the failure is still being handled would run with the failed call's
        # frames, and the device memory they hold, still alive.
        handling.append(sys.exc_info()[0])

    hook = engine.pipeline.transformer.register_forward_pre_hook(too_big, with_kwargs=True)
    try:
        results = generate_group(engine, items)
    finally:
        hook.remove()
    assert [r.ok for r in results] == [True] * 4
    assert [Image.open(BytesIO(r.image)).tobytes() for r in results] == alone, "split into batches of one"
    assert handling and set(handling) == {None}, "the retries ran inside the failure's except clause"


def test_a_failed_device_is_raised_as_such_not_as_the_jobs_failures(tmp_path):
    # Simulated as above: the error torch raises after an illegal memory access on a GPU. Every
    # later call would fail too, so no job may be failed for good: the caller stops instead.
    engine = Omni("tiny-sd3")
    storage = open_storage(str(tmp_path / "out"))
    items = [
        WorkItem(validate_job({"prompt": f"lost {i}", "dataset": "ds"}), None, storage) for i in range(2)
    ]
    lost = torch.AcceleratorError("CUDA error: an illegal memory access was encountered (simulated)")

    def broken(module, args, kwargs):
        raise lost

    hook = engine.pipeline.transformer.register_forward_pre_hook(broken, with_kwargs=True)
    try:
        with pytest.raises(
            DeviceLostError, match="the device failed: AcceleratorError: CUDA error"
        ) as caught:
            generate_group(engine, items)
    finally:
        hook.remove()
    assert caught.value.__cause__ is lost


def test_taking_a_group_reads_ahead_the_next_groups_adapters_but_not_its_own(make_adapter, tmp_path):
    from omni_engine.lora.request import LoRARequest
    from worker.admission import to_pending
    from worker.execute import take_group
    from worker.scheduler import SchedulerPolicy

    engine = Omni("tiny-sd3", device="cpu", max_loras=1, max_cpu_loras=4)
    storage = open_storage(str(tmp_path / "out"))
    requests = {name: LoRARequest(name, i + 1, str(make_adapter(name))) for i, name in enumerate("ab")}
    adapters = ["a"] * 10 + ["b"]  # "a" needs two calls of 8 and 2; "b" comes after
    window = []
    for i, name in enumerate(adapters):
        item = WorkItem(validate_job({"prompt": f"p{i}", "adapter": name}), requests[name], storage)
        window.append(to_pending(item, payload=item))

    group = take_group(engine, window, lambda pending: pending.payload, policy=SchedulerPolicy(max_batch=8))

    assert [p.adapter for p in group] == [requests["a"].lora_path] * 8
    # "a" is read by the group's own call; reading it ahead too would read it twice.
    assert engine._lora._prefetcher.pending() == [requests["b"].lora_path]


def test_a_bad_adapter_in_a_mixed_call_fails_only_its_own_jobs(make_adapter, tmp_path):
    from omni_engine.lora.request import LoRARequest

    engine = Omni("tiny-sd3", device="cpu", max_loras=3)
    storage = open_storage(str(tmp_path / "out"))
    broken = tmp_path / "adapters" / "broken"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text("{not json")
    requests = {name: LoRARequest(name, i + 1, str(make_adapter(name))) for i, name in enumerate("ab")}
    requests["broken"] = LoRARequest("broken", 3, str(broken))
    items = [
        WorkItem(validate_job({"prompt": f"p{i}", "adapter": name}), requests[name], storage)
        for i, name in enumerate(["broken", "a", "b", "a"])
    ]

    results = generate_group(engine, items)

    assert [r.ok for r in results] == [False, True, True, True]
    assert results[0].record["error_type"] == "InvalidAdapterError" and "broken" in results[0].record["error"]
    for item, result in zip(items[1:], results[1:], strict=True):
        alone = engine.generate(item.job.prompt, lora_request=item.request, seed=item.job.seed)[0]
        ours = Image.open(BytesIO(result.image)).tobytes()
        assert max(abs(x - y) for x, y in zip(ours, alone.images[0].tobytes(), strict=True)) <= 1
