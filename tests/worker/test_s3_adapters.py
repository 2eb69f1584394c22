"""Real adapters under an s3:// root, end to end: the embedded runner on each model family, and a
real `omni-batch worker` whose object store becomes unreachable or cuts a download off. S3 is
moto's server over HTTP (through fixtures.tcp_proxy where the network misbehaves)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from fixtures.embedded import assert_same_images_as_embedded
from fixtures.engine import TINY_MODELS
from fixtures.s3_server import S3Bucket
from fixtures.worker_process import DONE_TIMEOUT_S, POLL_S, assert_alive, wait_settled

from producer import layout
from producer.client import Client
from producer.schema import Job, validate_job
from producer.storage import open_storage
from worker.embedded import run_jobs
from worker.settings import WorkerSettings, build_engine

WEIGHTS = "adapter_model.safetensors"


def upload_dir(bucket: S3Bucket, directory: Path, name: str) -> None:
    """Every file of a local adapter directory to `adapters/<name>/` in the bucket."""
    for path in directory.iterdir():
        key = f"adapters/{name}/{path.name}"
        bucket.client.put_object(Bucket=bucket.bucket, Key=key, Body=path.read_bytes())


def s3_settings(bucket: S3Bucket, tmp_path: Path, out: Path, **overrides: object) -> WorkerSettings:
    return WorkerSettings(
        adapter_roots=(f"s3://{bucket.bucket}/adapters",),
        adapter_cache_dir=str(tmp_path / "adapter-cache"),
        output_uri=str(out),
        max_loras=1,
        max_cpu_loras=1,
        **overrides,
    )


def sidecar(out: Path, job: Job) -> dict:
    return json.loads((out / layout.sidecar_key(job.dataset, job.job_id)).read_bytes())


@pytest.mark.parametrize("tiny_model", TINY_MODELS)
def test_an_adapter_under_an_s3_root_gives_the_image_it_gives_from_a_local_root(
    tiny_model, make_adapter, s3_bucket, tmp_path
) -> None:
    local = make_adapter("styles/ink")
    upload_dir(s3_bucket, local, "styles/ink")
    jobs = [
        validate_job({"prompt": f"a cat {i}", "adapter": "styles/ink", "dataset": "s3"}) for i in range(2)
    ]
    out = tmp_path / "out"
    settings = s3_settings(s3_bucket, tmp_path, out, model=tiny_model)

    summary = run_jobs(jobs, engine=build_engine(settings), settings=settings)

    assert (summary.images, summary.failed) == (2, 0)
    weights_sha256 = hashlib.sha256((local / WEIGHTS).read_bytes()).hexdigest()
    assert {sidecar(out, job)["adapter_sha256"] for job in jobs} == {weights_sha256}
    assert_same_images_as_embedded(
        open_storage(str(out)), jobs, tmp_path / "adapters", tmp_path / "local", model=tiny_model
    )


def test_a_running_engine_follows_the_store_a_changed_adapter_and_a_deleted_one(
    make_adapter, s3_bucket, tmp_path
) -> None:
    upload_dir(s3_bucket, make_adapter("v1/styles/ink"), "styles/ink")
    upload_dir(s3_bucket, make_adapter("v1/styles/fox"), "styles/fox")
    engine = build_engine(s3_settings(s3_bucket, tmp_path, tmp_path / "unused"))
    cat = validate_job({"prompt": "a cat", "adapter": "styles/ink", "dataset": "s3"})

    def run(jobs: list[Job], out: Path):
        return run_jobs(jobs, engine=engine, settings=s3_settings(s3_bucket, tmp_path, out))

    run([cat], tmp_path / "before")
    upload_dir(s3_bucket, make_adapter("v2/styles/ink", seed=99), "styles/ink")  # both files replaced
    run([cat], tmp_path / "after")

    for out, version in (("before", "v1"), ("after", "v2")):
        assert_same_images_as_embedded(
            open_storage(str(tmp_path / out)), [cat], tmp_path / "adapters" / version, tmp_path / f"ref-{out}"
        )
    assert sidecar(tmp_path / "after", cat)["adapter_source"] == "disk"  # the new content, read anew

    for key in [o["Key"] for o in s3_bucket.client.list_objects_v2(Bucket=s3_bucket.bucket)["Contents"]]:
        if key.startswith("adapters/styles/ink/"):
            s3_bucket.client.delete_object(Bucket=s3_bucket.bucket, Key=key)
    fox = validate_job({"prompt": "a fox", "adapter": "styles/fox", "dataset": "s3"})
    summary = run([cat, fox], tmp_path / "deleted")

    assert (summary.images, summary.failed) == (1, 1)
    record = json.loads((tmp_path / "deleted" / layout.error_key("s3", cat.job_id)).read_bytes())
    assert record["error_type"] == "AdapterNotFoundError" and "'styles/ink'" in record["error"]
    assert sidecar(tmp_path / "deleted", fox)["status"] == "ok"


def _wait_for_log(worker, text: str, count: int) -> None:
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while worker.log.count(text) < count:
        assert_alive(worker)
        assert time.monotonic() < deadline, f"{text!r} not logged {count} times:\n{worker.log[-6000:]}"
        time.sleep(POLL_S)  # polling a condition with a deadline


def test_a_worker_requeues_jobs_while_the_store_is_unreachable_and_fails_a_cut_off_fetch_by_name(
    redis_url, make_adapter, s3_bucket, s3_proxy, start_worker, tmp_path, monkeypatch
) -> None:
    adapters = {name: make_adapter(name) for name in ("style-0", "style-1")}
    for name, directory in adapters.items():
        upload_dir(s3_bucket, directory, name)
    monkeypatch.setenv("OMNI_S3_ENDPOINT_URL", s3_proxy.endpoint_url)
    out = tmp_path / "out"
    storage = open_storage(str(out))
    s3_proxy.refusing = True
    waited = validate_job({"prompt": "a cat", "adapter": "style-0", "dataset": "s3"})
    with Client(redis_url) as client:
        client.submit_many([waited])
        worker = start_worker(
            "--broker", redis_url, "--adapter-root", f"s3://{s3_bucket.bucket}/adapters",
            "--adapter-cache-dir", str(tmp_path / "adapter-cache"), "--out", str(out), "--idle", "0.2",
        )  # fmt: skip

        # Put back, taken again, put back again: never failed for good while the store is away.
        _wait_for_log(worker, "adapter storage unreachable, back to the queue", 2)
        assert not storage.exists(layout.error_key("s3", waited.job_id))
        s3_proxy.clear()
        assert wait_settled(storage, "s3", [waited.job_id], worker=worker).done == 1

        half = (adapters["style-1"] / WEIGHTS).stat().st_size // 2
        s3_proxy.cut(f"/adapters/style-1/{WEIGHTS}", after=half)
        broken = validate_job({"prompt": "a dog", "adapter": "style-1", "dataset": "s3"})
        client.submit_many([broken])
        assert wait_settled(storage, "s3", [broken.job_id], worker=worker).failed == 1
        record = json.loads(storage.get_bytes(layout.error_key("s3", broken.job_id)))
        assert record["error_type"] == "AdapterDownloadError" and "'style-1'" in record["error"]
        assert "broke off" in record["error"]

        s3_proxy.clear()
        again = validate_job({"prompt": "a bird", "adapter": "style-1", "dataset": "s3"})
        client.submit_many([again])
        assert wait_settled(storage, "s3", [again.job_id], worker=worker).done == 1
    assert_alive(worker)
