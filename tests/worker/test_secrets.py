"""No secret leaks out of a real run: not into the worker's log, not into any object it stores, not
into the result backend, not into what `omni-batch submit` prints.

The secrets are the session's fake AWS credentials (tests/fixtures/s3_server.py) and the password of
a private redis-server; each test greps everything the run produced for all three.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fixtures.brokers import RedisBroker
from fixtures.command_process import OMNI_BATCH
from fixtures.redis_server import HOST, free_port, queued_messages
from fixtures.s3_server import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY
from fixtures.worker_process import wait_drained, wait_settled

from producer import defaults as d
from producer import settings
from producer.client import Client
from producer.schema import validate_job
from producer.storage import open_storage

REDIS_PASSWORD = "omni-test-redis-pass"
SECRETS = (FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, REDIS_PASSWORD)
DATASET = "secrets"
SUBMIT_TIMEOUT_S = 60


def _assert_no_secret(where: str, data: str | bytes) -> None:
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    found = [secret for secret in SECRETS if secret in text]
    assert not found, f"{found} leaked into {where}:\n{text[-4000:]}"


def _results_url(broker_url: str) -> str:
    return broker_url.rsplit("/", 1)[0] + "/1"


def _kombu_bodies(value: Any) -> Iterator[bytes]:
    """The decoded bodies of kombu envelopes inside a JSON value: kombu stores them base64-encoded."""
    if isinstance(value, dict):
        body, properties = value.get("body"), value.get("properties")
        if (
            isinstance(body, str)
            and isinstance(properties, dict)
            and properties.get("body_encoding") == "base64"
        ):
            yield base64.b64decode(body)
        for item in value.values():
            yield from _kombu_bodies(item)
    elif isinstance(value, list):
        for item in value:
            yield from _kombu_bodies(item)


def _redis_contents(server) -> Iterator[tuple[str, bytes]]:
    """Every key and value of every database of the server, and the bodies of kombu envelopes."""
    with server.client() as admin:
        databases = [int(name[2:]) for name in admin.info("keyspace")]
    for db in databases:
        client = redis.Redis(host=HOST, port=server.port, password=server.password, db=db, socket_timeout=5)
        with client:
            for key in client.scan_iter(count=1000):
                kind = client.type(key).decode()
                if kind == "string":
                    values = [client.get(key)]
                elif kind == "hash":
                    values = [b for pair in client.hgetall(key).items() for b in pair]
                elif kind == "list":
                    values = client.lrange(key, 0, -1)
                elif kind == "set":
                    values = list(client.smembers(key))
                elif kind == "zset":
                    values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
                else:
                    values = [repr(client.dump(key)).encode()]
                where = f"redis db {db} key {key!r}"
                yield where, key
                for value in values:
                    yield where, value
                    try:
                        decoded = json.loads(value)
                    except (ValueError, TypeError):
                        continue
                    for body in _kombu_bodies(decoded):
                        yield f"{where} (message body)", body


def _bucket_contents(s3_bucket) -> Iterator[tuple[str, bytes]]:
    """Every object in the bucket, its key and its bytes."""
    client = s3_bucket.client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket.bucket):
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            body = client.get_object(Bucket=s3_bucket.bucket, Key=key)["Body"].read()
            yield f"s3://{s3_bucket.bucket}/{key}", key.encode() + b"\n" + body


def _assert_run_leaked_nothing(worker, s3_bucket, server) -> int:
    """Grep the worker's whole log, every stored object and all of Redis; returns the objects seen."""
    _assert_no_secret("the worker's log", worker.log)
    objects = 0
    for where, data in _bucket_contents(s3_bucket):
        objects += 1
        _assert_no_secret(where, data)
    for where, data in _redis_contents(server):
        _assert_no_secret(where, data)
    return objects


@pytest.fixture
def adapter_root(make_adapter, tmp_path) -> Path:
    for name in ("ink", "oil"):
        make_adapter(name)
    return tmp_path / "adapters"


def test_a_whole_run_leaks_no_secret(
    redis_server_factory, s3_bucket, start_worker, adapter_root, monkeypatch
):
    server = redis_server_factory(password=REDIS_PASSWORD)
    # Configured the way the contract says: the environment (flags are tested below).
    monkeypatch.setenv(settings.ENV_BROKER_URL, server.url)
    monkeypatch.setenv(settings.ENV_RESULT_BACKEND, _results_url(server.url))
    worker = start_worker("--adapter-root", str(adapter_root), "--out", s3_bucket.uri, "--idle", "0.2")

    good = [
        validate_job({"prompt": f"good {i}", "adapter": adapter, "dataset": DATASET})
        for i, adapter in enumerate(["ink", "oil", None])
    ]
    unknown = validate_job({"prompt": "who?", "adapter": "no-such-style", "dataset": DATASET})
    raw = {"job_id": "raw-invalid", "dataset": DATASET, "prompt": "x", "width": 30, "surprise": 1}
    with Client(server.url) as client:
        client.submit_many([*good, unknown])
        client.app.send_task(d.TASK_NAME, args=[raw], queue=d.QUEUE, task_id=raw["job_id"])

    storage = open_storage(s3_bucket.uri)
    status = wait_settled(
        storage, DATASET, {*(j.job_id for j in [*good, unknown]), raw["job_id"]}, worker=worker
    )
    assert status.done == 3 and status.failed == 2
    wait_drained(RedisBroker(server))
    # The result backend holds the failures (so the scan below reads real records).
    with redis.Redis(host=HOST, port=server.port, password=REDIS_PASSWORD, db=1) as results:
        assert any(results.scan_iter(match="celery-task-meta-*"))
    assert worker.stop() == 0  # the shutdown's lines belong to the log too

    # Images, sidecars and error records: 3 x 2 + 2.
    assert _assert_run_leaked_nothing(worker, s3_bucket, server) == 8


def test_debug_logging_leaks_no_secret(redis_server_factory, s3_bucket, start_worker, monkeypatch):
    server = redis_server_factory(password=REDIS_PASSWORD)
    monkeypatch.setenv(settings.ENV_RESULT_BACKEND, _results_url(server.url))
    worker = start_worker(
        "--broker", server.url, "--out", s3_bucket.uri, "--idle", "0.2", "--loglevel", "DEBUG"
    )
    job = validate_job({"prompt": "debug", "dataset": DATASET})
    with Client(server.url) as client:
        client.submit(job)
    wait_settled(open_storage(s3_bucket.uri), DATASET, {job.job_id}, worker=worker)
    assert worker.stop() == 0
    assert "DEBUG" in worker.log
    _assert_run_leaked_nothing(worker, s3_bucket, server)


def test_credentials_sent_in_a_job_are_refused_and_never_stored(
    redis_server_factory, s3_bucket, start_worker
):
    server = redis_server_factory(password=REDIS_PASSWORD)
    worker = start_worker("--broker", server.url, "--out", s3_bucket.uri, "--idle", "0.2")
    # A careless (or hostile) client puts real credentials in the job itself.
    raw = {
        "job_id": "creds-in-output",
        "dataset": DATASET,
        "prompt": "x",
        "output": f"s3://{FAKE_ACCESS_KEY_ID}:{FAKE_SECRET_ACCESS_KEY}@bucket/p",
    }
    with Client(server.url) as client:
        client.app.send_task(d.TASK_NAME, args=[raw], queue=d.QUEUE, task_id=raw["job_id"])
    storage = open_storage(s3_bucket.uri)
    wait_settled(storage, DATASET, {raw["job_id"]}, worker=worker)
    record = json.loads(storage.get_bytes(f"{DATASET}/{raw['job_id']}.error.json"))
    assert record["error_type"] == "JobValidationError" and "output" in record["error"]
    assert worker.stop() == 0
    assert _assert_run_leaked_nothing(worker, s3_bucket, server) == 1


def _submit(jobs: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != settings.ENV_BROKER_URL}
    return subprocess.run(
        [str(OMNI_BATCH), "submit", str(jobs), *args],
        capture_output=True,
        text=True,
        env={**environ, **(env or {})},
        timeout=SUBMIT_TIMEOUT_S,
        check=False,
    )


def test_submit_never_prints_the_broker_password(redis_server_factory, tmp_path):
    server = redis_server_factory(password=REDIS_PASSWORD)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": f"p{i}", "dataset": DATASET}) + "\n" for i in range(3)))
    # Holds the real password as a substring, so the grep below covers the wrong one too.
    wrong = f"redis://:wrong-{REDIS_PASSWORD}@{HOST}:{server.port}/0"
    unreachable = f"redis://:{REDIS_PASSWORD}@{HOST}:{free_port()}/0"
    with_user = f"redis://default:{REDIS_PASSWORD}@{HOST}:{server.port}/0"

    runs = {
        "flag": (_submit(jobs, "--broker", server.url), 0),
        "environment": (_submit(jobs, env={settings.ENV_BROKER_URL: server.url}), 0),
        "user and password": (_submit(jobs, "--broker", with_user), 0),
        "wrong password": (_submit(jobs, "--broker", wrong), 1),
        "unreachable": (_submit(jobs, "--broker", unreachable), 1),
        "unreachable, environment": (_submit(jobs, env={settings.ENV_BROKER_URL: unreachable}), 1),
    }
    for name, (result, code) in runs.items():
        output = result.stdout + result.stderr
        assert result.returncode == code, f"{name}: exit {result.returncode}\n{output}"
        _assert_no_secret(f"omni-batch submit output ({name})", output)
        assert "***" in output, f"{name}: the broker is not named, masked:\n{output}"
    assert "submitted 3 jobs" in runs["flag"][0].stdout
    assert "unavailable" in runs["unreachable"][0].stderr
    with server.client() as client:
        assert len(queued_messages(client, d.QUEUE)) == 3 * 3  # three runs reached the broker
