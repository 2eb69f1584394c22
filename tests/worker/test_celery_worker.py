"""The whole loop on real parts: a real broker (a private redis-server, a RabbitMQ vhost), a real
`omni-batch worker` process, S3 over HTTP (moto's server), the tiny model and real adapters.
Nothing is mocked."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from celery import Celery
from celery.result import AsyncResult
from fixtures.embedded import assert_same_images_as_embedded
from fixtures.worker_process import ADAPTERS, wait_drained, wait_settled, worker_flags

from producer import layout
from producer.client import Client
from producer.progress import wait_for_jobs
from producer.schema import validate_job
from producer.storage import open_storage

# The grouping bound: one cold load per adapter, plus this much slack for a window that starts
# a group before every job has been reserved.
LOAD_SLACK = 2


def test_interleaved_jobs_are_grouped_and_match_the_embedded_runner(
    broker, s3_bucket, six_adapters, start_worker, tmp_path
):
    jobs = [
        validate_job({"prompt": f"picture {i}", "adapter": name, "dataset": "e2e"})
        for i in range(10)
        for name in ADAPTERS
    ]
    with Client(broker.url) as client:
        client.submit_many(jobs)
    start_worker(*worker_flags(broker.url, six_adapters, s3_bucket.uri))

    storage = open_storage(s3_bucket.uri)
    status = wait_settled(storage, "e2e", (j.job_id for j in jobs))
    assert status.done == 60 and status.failed == 0

    sidecars = [json.loads(storage.get_bytes(layout.sidecar_key("e2e", j.job_id))) for j in jobs]
    # The jobs of one engine call share its timings to the last digit: one call, one entry.
    calls = {
        (s["adapter_sha256"], s["timings"]["adapter_s"], s["timings"]["generate_s"]): s for s in sidecars
    }
    cold = sum(s["adapter_source"] == "disk" for s in calls.values())
    # With one adapter cached, one job at a time in arrival order would load 60 times.
    assert cold <= len(ADAPTERS) + LOAD_SLACK, cold
    assert {s["status"] for s in sidecars} == {"ok"}

    assert_same_images_as_embedded(storage, jobs, six_adapters, tmp_path / "embedded")


def test_bad_jobs_fail_clearly_and_every_other_job_succeeds(
    broker, redis_url, s3_bucket, six_adapters, start_worker, monkeypatch
):
    results_url = redis_url.rsplit("/", 1)[0] + "/1"
    monkeypatch.setenv("OMNI_RESULT_BACKEND", results_url)
    good = [validate_job({"prompt": f"ok {i}", "adapter": ADAPTERS[i], "dataset": "mixed"}) for i in range(3)]
    unknown = validate_job({"prompt": "who?", "adapter": "no-such-style", "dataset": "mixed"})
    with Client(broker.url) as client:
        client.submit_many([*good, unknown])
        # A job that skipped the producer's checks, as any Celery client can send one.
        raw = {"job_id": "raw-bad-size", "dataset": "mixed", "prompt": "x", "width": 30}
        client.app.send_task("omni.generate", args=[raw], queue="omni", task_id="raw-bad-size")
        # A job whose deadline passed before any worker saw it: honoured, never generated.
        late = validate_job({"prompt": "too late", "dataset": "mixed"})
        client.app.send_task(
            "omni.generate",
            args=[late.wire_dict()],
            queue="omni",
            task_id=late.job_id,
            expires=datetime.now(UTC) - timedelta(minutes=1),
        )
    start_worker(*worker_flags(broker.url, six_adapters, s3_bucket.uri))

    storage = open_storage(s3_bucket.uri)
    expected = [*good, unknown]
    status = wait_for_jobs(
        storage,
        "mixed",
        frozenset([*(j.job_id for j in expected), "raw-bad-size"]),
        timeout=300,
        interval=0.2,
    )
    assert status.done == 3 and status.failed == 2

    missing = json.loads(storage.get_bytes(layout.error_key("mixed", unknown.job_id)))
    assert missing["status"] == "failed" and missing["error_type"] == "AdapterNotFoundError"
    assert "no-such-style" in missing["error"]
    bad_size = json.loads(storage.get_bytes(layout.error_key("mixed", "raw-bad-size")))
    assert bad_size["error_type"] == "JobValidationError" and "width" in bad_size["error"]
    wait_drained(broker)
    assert not any(late.job_id in key for key in storage.list_keys("mixed/")), "an expired job ran"

    # With a result backend, a failed job is also Celery's FAILURE, with the reason.
    results = Celery(backend=results_url)
    failed = AsyncResult(unknown.job_id, app=results)
    assert failed.state == "FAILURE" and "no-such-style" in str(failed.result)


def test_a_job_sent_twice_and_a_finished_dataset_generate_nothing_more(
    broker, s3_bucket, six_adapters, start_worker
):
    jobs = [
        validate_job({"prompt": f"once {i}", "adapter": ADAPTERS[0], "dataset": "again"}) for i in range(3)
    ]
    with Client(broker.url) as client:
        client.submit_many([jobs[0], jobs[0]])
        start_worker(*worker_flags(broker.url, six_adapters, s3_bucket.uri))
        storage = open_storage(s3_bucket.uri)
        wait_settled(storage, "again", [jobs[0].job_id])
        client.submit_many(jobs)
        wait_settled(storage, "again", (j.job_id for j in jobs))
        first = {j.job_id: storage.get_bytes(layout.sidecar_key("again", j.job_id)) for j in jobs}

        client.submit_many(jobs)  # the whole dataset again
        wait_drained(broker)
    # Every sidecar carries its run's timings: unchanged bytes mean nothing was generated again.
    assert {j.job_id: storage.get_bytes(layout.sidecar_key("again", j.job_id)) for j in jobs} == first
