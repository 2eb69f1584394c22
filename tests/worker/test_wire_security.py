"""Hostile messages on the wire, against a real `omni-batch worker`: nothing they carry may run, no
path they name may be read or written outside what the worker allows, and the worker keeps serving.

Messages are published the way an attacker with access to the broker would: with kombu directly
(any content type, any body) or with a plain Celery client (any task name, any arguments).
"""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from fixtures.brokers import RedisBroker
from fixtures.hostile import Exploit
from fixtures.worker_process import assert_alive, wait_drained, wait_settled
from kombu import Connection

from producer import defaults as d
from producer import layout, settings
from producer.client import Client, celery_config
from producer.schema import Job, validate_job
from producer.storage import Storage, open_storage

DATASET = "hostile"
# The bound on every wait: a tiny-model job takes well under a second once the worker is up.
WIRE_SECRET = "wire-secret-pass"


def _worker_flags(redis_url: str, out: str, *extra: str) -> list[str]:
    return ["--broker", redis_url, "--out", out, "--window", "8", "--idle", "0.2", *extra]


def _headers(task: str, task_id: str) -> dict[str, Any]:
    """Celery's protocol-2 headers, as any client writes them."""
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "hostile@test",
    }


def _publish_raw(redis_url: str, body: bytes, *, content_type: str) -> str:
    """Put one message on the `omni` queue with kombu, bypassing Celery's serializer; returns its id."""
    task_id = uuid.uuid4().hex
    options = celery_config(redis_url)["broker_transport_options"]
    with Connection(redis_url, transport_options=options) as connection:
        connection.Producer().publish(
            body,
            exchange="",
            routing_key=d.QUEUE,
            content_type=content_type,
            content_encoding="binary",
            headers=_headers(d.TASK_NAME, task_id),
            serializer=None,
        )
    return task_id


def _send_raw_job(client: Client, job: dict[str, Any]) -> None:
    """A job as any Celery client can send it: no producer-side validation."""
    client.app.send_task(d.TASK_NAME, args=[job], queue=d.QUEUE, task_id=job["job_id"])


def _serves_a_good_job(redis_url: str, storage: Storage, worker, tag: str) -> Job:
    """The worker still generates: a normal job submitted now completes."""
    job = validate_job({"prompt": f"still serving {tag}", "dataset": "after"})
    with Client(redis_url) as client:
        client.submit(job)
    status = wait_settled(storage, "after", {job.job_id}, worker=worker)
    assert status.done == 1 and status.failed == 0
    return job


def _record(storage: Storage, dataset: str, job_id: str) -> dict[str, Any]:
    raw = storage.get_bytes(layout.error_key(dataset, job_id))
    assert raw is not None, f"no error record for {dataset}/{job_id}"
    record = json.loads(raw)
    assert record["status"] == "failed"
    return record


def test_pickle_and_foreign_tasks_are_refused_and_run_nothing(
    redis_url, redis_server, start_worker, tmp_path
):
    out = str(tmp_path / "out")
    marker = tmp_path / "marker"
    worker = start_worker(*_worker_flags(redis_url, out))
    storage = open_storage(out)

    # 1. omni.generate headers, a pickle body whose unpickling writes the marker: declared as
    #    pickle, and lying that it is JSON.
    exploit = pickle.dumps(((Exploit(marker),), {}, {"callbacks": None, "errbacks": None, "chain": None}))
    _publish_raw(redis_url, exploit, content_type="application/x-python-serialize")
    _publish_raw(redis_url, exploit, content_type="application/json")

    # 2. JSON messages naming tasks the worker must never run.
    with Client(redis_url) as client:
        client.app.send_task("os.system", args=[f"touch {marker}"], queue=d.QUEUE)
        client.app.send_task("subprocess.check_call", args=[["touch", str(marker)]], queue=d.QUEUE)
        client.app.send_task("builtins.exec", args=[f"open({str(marker)!r}, 'w')"], queue=d.QUEUE)

        # 3. omni.generate with arguments that are no job: each one is recorded as failed, by task id.
        job = {"prompt": "p", "dataset": DATASET}
        odd = {
            "kwargs-only": {"kwargs": {"job": job}},
            "two-args": {"args": [job, job]},
            "a-string": {"args": ["rm -rf /"]},
            "no-args": {"args": []},
            "a-list": {"args": [[job]]},
        }
        for task_id, call in odd.items():
            client.app.send_task(d.TASK_NAME, queue=d.QUEUE, task_id=task_id, **call)
    wait_drained(RedisBroker(redis_server), worker=worker)

    for task_id in odd:
        record = _record(storage, d.DEFAULT_DATASET, task_id)
        assert record["error_type"] == "JobValidationError", record
    _serves_a_good_job(redis_url, storage, worker, "pickle")
    # Drained, so every hostile message was taken and settled before the good job ran.
    assert not marker.exists(), "a hostile message ran code in the worker"
    assert_alive(worker)


def test_celery_builtin_tasks_are_not_served(redis_url, redis_server, start_worker, tmp_path, monkeypatch):
    results_url = redis_url.rsplit("/", 1)[0] + "/1"
    monkeypatch.setenv(settings.ENV_RESULT_BACKEND, results_url)
    out = str(tmp_path / "out")
    worker = start_worker(*_worker_flags(redis_url, out))
    with Client(redis_url) as client:
        sent = {
            "accumulate": client.app.send_task("celery.accumulate", args=[1, 2], queue=d.QUEUE).id,
            "cleanup": client.app.send_task("celery.backend_cleanup", queue=d.QUEUE).id,
        }
    wait_drained(RedisBroker(redis_server), worker=worker)
    _serves_a_good_job(redis_url, open_storage(out), worker, "builtins")

    results = Celery(backend=results_url, set_as_current=False)
    ran = {name: AsyncResult(task_id, app=results).state for name, task_id in sent.items()}
    assert "SUCCESS" not in ran.values(), f"built-in Celery tasks ran in the worker: {ran}"


def test_malformed_envelopes_are_discarded_and_the_worker_keeps_serving(
    redis_url, redis_server, start_worker, tmp_path
):
    out = str(tmp_path / "out")
    worker = start_worker(*_worker_flags(redis_url, out))
    bodies = [b'"hello"', b"[1, 2]", b"null", b"42", b"{}", b"[]", b"[[], {}]", b"\xff\xfe not utf-8"]
    for body in bodies:
        _publish_raw(redis_url, body, content_type="application/json")
    wait_drained(RedisBroker(redis_server), worker=worker)
    _serves_a_good_job(redis_url, open_storage(out), worker, "envelopes")
    assert_alive(worker)


def test_path_like_adapters_and_foreign_outputs_fail_with_an_error_record(
    redis_url, redis_server, start_worker, make_adapter, tmp_path
):
    make_adapter("good")
    root = tmp_path / "adapters"
    # A real, valid adapter just outside the root: loading it would make the job succeed.
    outside = make_adapter("../outside")
    assert outside.resolve() == (tmp_path / "outside").resolve()
    (root / "escape").symlink_to(outside.resolve(), target_is_directory=True)
    outside_before = sorted((p.name, p.stat().st_mtime_ns) for p in outside.iterdir())
    out = str(tmp_path / "out")
    worker = start_worker(*_worker_flags(redis_url, out, "--adapter-root", str(root)))

    bad_adapters = {
        "adapter-parent": "../outside",
        "adapter-nested-parent": "good/../../outside",
        "adapter-absolute": "/etc",
        "adapter-absolute-real": str(outside),
        "adapter-s3": "s3://bucket/x",
        "adapter-home": "~/x",
    }
    bad_outputs = {
        "output-ftp": "ftp://x/y",
        "output-credentials": f"s3://key:{WIRE_SECRET}@bucket/p",
        "output-http": "http://example.com/out",
        "output-remote-file": "file://evil.example/tmp/x",
        "output-control": "/tmp/x\ny",
    }
    good = [
        validate_job({"prompt": f"good {i}", "adapter": adapter, "dataset": DATASET})
        for i, adapter in enumerate(["good", None, "good"])
    ]
    # Valid on the wire (a plain name), but a symlink out of the root: refused when resolved.
    escape = validate_job(
        {"job_id": "adapter-symlink", "prompt": "x", "adapter": "escape", "dataset": DATASET}
    )
    with Client(redis_url) as client:
        for job_id, adapter in bad_adapters.items():
            _send_raw_job(client, {"job_id": job_id, "dataset": DATASET, "prompt": "x", "adapter": adapter})
        for job_id, output in bad_outputs.items():
            _send_raw_job(client, {"job_id": job_id, "dataset": DATASET, "prompt": "x", "output": output})
        client.submit_many([*good, escape])

    storage = open_storage(out)
    bad_ids = {*bad_adapters, *bad_outputs, escape.job_id}
    status = wait_settled(storage, DATASET, bad_ids | {j.job_id for j in good}, worker=worker)
    assert status.done == len(good), status
    assert set(status.failed_job_ids) == bad_ids

    for job_id in bad_adapters:
        record = _record(storage, DATASET, job_id)
        assert record["error_type"] == "JobValidationError", record
        assert "adapter" in record["error"], record
    for job_id in bad_outputs:
        record = _record(storage, DATASET, job_id)
        assert record["error_type"] == "JobValidationError", record
        assert "output" in record["error"], record
        assert WIRE_SECRET not in record["error"]
    record = _record(storage, DATASET, escape.job_id)
    assert record["error_type"] == "AdapterAccessError" and "escape" in record["error"], record

    keys = set(storage.list_keys(f"{DATASET}/"))
    for job_id in bad_ids:
        assert layout.image_key(DATASET, job_id) not in keys
        assert layout.sidecar_key(DATASET, job_id) not in keys
    # Nothing was written beside the outside adapter, and nothing at the hostile output paths.
    assert sorted((p.name, p.stat().st_mtime_ns) for p in outside.iterdir()) == outside_before
    assert not Path("/tmp/x\ny").exists()
    assert WIRE_SECRET not in worker.log
    assert_alive(worker)
    # The good jobs around them ran normally, each with its own adapter.
    for job in good:
        sidecar = json.loads(storage.get_bytes(layout.sidecar_key(DATASET, job.job_id)))
        assert sidecar["status"] == "ok" and sidecar["adapter"] == job.adapter
