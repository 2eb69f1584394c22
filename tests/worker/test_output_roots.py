"""Outputs confined to the worker's own output and OMNI_OUTPUT_ROOTS: the rule, then a real run
(tiny model, local directories and S3 over HTTP) and a real worker process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fixtures.worker_process import wait_settled, worker_flags

from producer import layout
from producer.client import Client
from producer.errors import OutputNotAllowedError, SettingsError
from producer.schema import validate_job
from producer.settings import ENV_OUTPUT_ROOTS, read_environment, split_roots
from producer.storage import open_storage
from worker.embedded import run_jobs
from worker.output_roots import OutputRoots
from worker.settings import WorkerSettings, build_engine


def test_local_roots_hold_their_subdirectories_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    roots = OutputRoots([str(tmp_path / "out")])
    for allowed in ["out", "out/", "out/new/deeper", "out/sub/../sub2"]:
        assert roots.allows(str(tmp_path / allowed)), allowed
    assert roots.allows(f"file://{tmp_path / 'out' / 'x'}")
    for refused in ["out2", "out-other/x", "", "out/../elsewhere", "out/link", "out/link/x"]:
        assert not roots.allows(str(tmp_path / refused)), refused
    assert not roots.allows("s3://bucket/out")


def test_a_symlinked_root_holds_what_it_points_to(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    roots = OutputRoots([str(tmp_path / "alias")])
    assert roots.allows(str(tmp_path / "real" / "x")) and roots.allows(str(tmp_path / "alias" / "x"))


def test_s3_roots_match_bucket_and_whole_prefix_segments() -> None:
    roots = OutputRoots(["s3://bucket/out/run1", "s3://open-bucket"])
    for allowed in [
        "s3://bucket/out/run1",
        "s3://bucket/out/run1/",
        "s3://bucket/out/run1/a/b",
        "s3://open-bucket/x",
    ]:
        assert roots.allows(allowed), allowed
    for refused in [
        "s3://bucket/out/run10",
        "s3://bucket/out",
        "s3://bucket",
        "s3://other/out/run1",
        "/out/run1",
    ]:
        assert not roots.allows(refused), refused


def test_a_refusal_names_the_output_the_roots_and_the_setting(tmp_path: Path) -> None:
    roots = OutputRoots([str(tmp_path), "s3://bucket/p"])
    with pytest.raises(OutputNotAllowedError) as error:
        roots.check("/etc/cron.d")
    message = str(error.value)
    assert "/etc/cron.d" in message and str(tmp_path) in message and "s3://bucket/p" in message
    assert ENV_OUTPUT_ROOTS in message


def test_the_roots_list_splits_on_pathsep_and_keeps_uris_whole() -> None:
    text = os.pathsep.join(["s3://bucket/a", "/data/out", "", "file:///srv/x", "s3://b2"])
    assert split_roots(text) == ("s3://bucket/a", "/data/out", "file:///srv/x", "s3://b2")
    assert read_environment({ENV_OUTPUT_ROOTS: text}).output_roots == split_roots(text)
    assert read_environment({}).output_roots == ()


def test_the_default_is_the_workers_own_output_alone_and_a_bad_root_is_refused_by_name() -> None:
    assert WorkerSettings(output_uri="s3://bucket/out").allowed_outputs == ("s3://bucket/out",)
    assert WorkerSettings(output_uri="/o", output_roots=("/o", "/r")).allowed_outputs == ("/o", "/r")
    with pytest.raises(SettingsError, match=ENV_OUTPUT_ROOTS):
        WorkerSettings(output_roots=("s3://BAD_bucket/x",))


@pytest.mark.parametrize("output_uri", ["local", "s3"], indirect=True)
def test_the_embedded_runner_refuses_an_output_outside_the_roots_under_its_own_output(
    tmp_path: Path, output_uri: str
) -> None:
    # The run's own output is output_uri; one more root is allowed, of the same kind.
    if output_uri.startswith("s3://"):
        allowed, outside = f"{output_uri}-allowed/sub", f"{output_uri}-allowed2"
    else:
        allowed, outside = str(tmp_path / "allowed" / "sub"), str(tmp_path / "allowed2")
    root = allowed.rsplit("/", 1)[0]
    jobs = [
        validate_job({"prompt": "stays", "dataset": "conf"}),
        validate_job({"prompt": "elsewhere", "dataset": "conf", "output": allowed}),
        validate_job({"job_id": "escape", "prompt": "out", "dataset": "conf", "output": outside}),
    ]
    settings = WorkerSettings(output_uri=output_uri, output_roots=(root,))
    summary = run_jobs(jobs, engine=build_engine(settings), settings=settings)
    assert (summary.images, summary.failed) == (2, 1)

    own, other, refused = open_storage(output_uri), open_storage(allowed), open_storage(outside)
    assert own.exists(layout.sidecar_key("conf", jobs[0].job_id))
    assert other.exists(layout.sidecar_key("conf", jobs[1].job_id))
    record = json.loads(own.get_bytes(layout.error_key("conf", "escape")))
    assert record["status"] == "failed" and record["error_type"] == "OutputNotAllowedError"
    assert outside in record["error"]
    assert list(refused.list_keys()) == [], "nothing is written where the refused job pointed"


def test_a_worker_writes_only_under_its_roots_and_records_the_rest_under_its_own_output(
    redis_url, s3_bucket, six_adapters, start_worker, tmp_path, monkeypatch
) -> None:
    allowed, forbidden = tmp_path / "allowed", tmp_path / "forbidden"
    bucket = f"s3://{s3_bucket.bucket}"  # the worker's own output is <bucket>/out
    monkeypatch.setenv(ENV_OUTPUT_ROOTS, os.pathsep.join([str(allowed), f"{bucket}/extra"]))
    outputs = {
        "own": None,
        "local-root": str(allowed),
        "s3-root": f"{bucket}/extra/x",
        "local-out": str(forbidden),
        "traversal": f"{allowed}/../forbidden",
        "s3-prefix": f"{bucket}/extra2",
    }
    jobs = [
        validate_job({"job_id": job_id, "prompt": job_id, "dataset": "roots", "output": output})
        for job_id, output in outputs.items()
    ]
    with Client(redis_url) as client:
        client.submit_many(jobs)
    start_worker(*worker_flags(redis_url, six_adapters, s3_bucket.uri, "--idle", "0.2"))

    own = open_storage(s3_bucket.uri)
    refused = ["local-out", "traversal", "s3-prefix"]
    wait_settled(own, "roots", ["own", *refused])
    wait_settled(open_storage(str(allowed)), "roots", ["local-root"])
    wait_settled(open_storage(f"{bucket}/extra/x"), "roots", ["s3-root"])
    for job_id in refused:
        record = json.loads(own.get_bytes(layout.error_key("roots", job_id)))
        assert record["error_type"] == "OutputNotAllowedError", record
        assert "outside this worker's allowed output roots" in record["error"]
    assert own.exists(layout.sidecar_key("roots", "own"))
    assert not forbidden.exists()
    pages = s3_bucket.client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket.bucket)
    assert not [
        obj["Key"] for page in pages for obj in page.get("Contents", ()) if obj["Key"].startswith("extra2")
    ]
