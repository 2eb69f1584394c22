"""Faults on real processes: workers killed and stopped, the broker and S3 going away, poison jobs.

Tests whose behaviour is the same on both brokers run on each (`broker`, `restartable_broker`:
Redis and RabbitMQ); the rest are Redis's own. Every test starts its own servers so it can kill
them. The kill -9 test runs at the shipped settings (on Redis, the 60 s visibility timeout that live
workers' leases keep from expiring); others use a few seconds so that a dead worker's jobs come back
from Redis at once. RabbitMQ returns them when the connection closes.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import textwrap
import time
import uuid
from datetime import datetime, timedelta

import boto3
import pytest
import redis
from fixtures.brokers import wait_for_counts
from fixtures.embedded import assert_same_images_as_embedded
from fixtures.redis_server import free_port, queued_messages, reserved_restorer
from fixtures.worker_process import ADAPTERS, DONE_TIMEOUT_S, wait_for, wait_settled, worker_flags
from moto.server import ThreadedMotoServer

from producer import defaults as d
from producer import layout
from producer.client import Client
from producer.errors import BrokerUnavailableError
from producer.schema import validate_job
from producer.storage import open_storage

SHORT_VISIBILITY_S = "4"


@pytest.fixture
def short_visibility(monkeypatch):
    monkeypatch.setenv("OMNI_VISIBILITY_TIMEOUT", SHORT_VISIBILITY_S)


@pytest.fixture
def shipped_defaults(monkeypatch):
    """No test-only timeout: the worker runs with the visibility timeout a user gets."""
    monkeypatch.delenv("OMNI_VISIBILITY_TIMEOUT", raising=False)


# At the shipped defaults a killed worker's jobs are released within one visibility timeout plus
# a sweep (70 s); the bound on that is three minutes from the kill. Generating them afterwards is
# bounded as every wait is (DONE_TIMEOUT_S): on a loaded machine it is the slower part.
RECOVERY_DEADLINE_S = 180


def _jobs(dataset: str, count: int) -> list:
    return [
        validate_job({"prompt": f"{dataset} {i}", "adapter": ADAPTERS[i % 3], "dataset": dataset})
        for i in range(count)
    ]


# Batched float math depends on what a job is batched with, by a unit in the last place; a job
# run again after a crash lands in another batch. One job per call makes every image independent
# of scheduling, so a rerun writes the very same bytes.
ONE_PER_CALL = ("--max-batch", "1")


def _assert_each_once_with_the_right_bytes(storage, jobs, adapter_root, tmp_path) -> None:
    """One image and one sidecar per job, and the image is, byte for byte, what a clean run makes."""
    keys = set(storage.list_keys(f"{jobs[0].dataset}/"))
    for job in jobs:
        assert layout.sidecar_key(job.dataset, job.job_id) in keys
        assert layout.error_key(job.dataset, job.job_id) not in keys
    images = [k for k in keys if k.endswith(layout.IMAGE_SUFFIX)]
    assert len(images) == len(jobs)
    assert_same_images_as_embedded(storage, jobs, adapter_root, tmp_path / "reference", max_batch=1)


def test_kill_9_mid_group_loses_nothing_and_duplicates_nothing(
    broker, s3_bucket, six_adapters, start_worker, shipped_defaults, tmp_path
):
    jobs = _jobs("killed", 24)
    with Client(broker.url) as client:
        client.submit_many(jobs)
    storage = open_storage(s3_bucket.uri)
    first = start_worker(
        *worker_flags(broker.url, six_adapters, s3_bucket.uri, "--idle", "0.2", *ONE_PER_CALL)
    )
    wait_for(lambda: any(k.endswith(".json") for k in storage.list_keys("killed/")), "a first sidecar")
    first.stop(signal.SIGKILL)
    killed_at = time.time()
    redis = broker.server.client() if broker.kind == "redis" else None
    orphans = {tag.decode() for tag in redis.hkeys("unacked")} if redis is not None else set()

    start_worker(*worker_flags(broker.url, six_adapters, s3_bucket.uri, "--idle", "0.2", *ONE_PER_CALL))

    def released() -> bool:
        # Each reservation of the dead worker is gone (restored, acked) or renewed since the kill
        # (taken again, by the live worker: a message keeps its tag when it is restored).
        leases = {tag.decode(): score for tag, score in redis.zrange("unacked_index", 0, -1, withscores=True)}
        return all(leases.get(tag, math.inf) > killed_at for tag in orphans)

    if redis is not None:  # RabbitMQ returns them as the connection closes
        wait_for(released, "the killed worker's jobs released", timeout=RECOVERY_DEADLINE_S)
    wait_settled(storage, "killed", (j.job_id for j in jobs), broker_url=broker.url)
    _assert_each_once_with_the_right_bytes(storage, jobs, six_adapters, tmp_path)


def test_a_job_redelivered_while_held_is_not_lost_when_the_worker_dies(
    redis_url, s3_bucket, six_adapters, start_worker, short_visibility, tmp_path
):
    # Sent twice, each job comes to the worker again while it still holds the first delivery;
    # acking the second delivery early would lose the job when the worker then dies.
    jobs = _jobs("held", 5)
    with Client(redis_url) as client:
        client.submit_many(jobs)
        client.submit_many(jobs)
    holder = start_worker(
        *worker_flags(redis_url, six_adapters, s3_bucket.uri, "--idle", "3600", "--loglevel", "DEBUG")
    )
    wait_for(lambda: "delivered again while held" in holder.log, "a redelivery to the holding worker")
    holder.stop(signal.SIGKILL)

    start_worker(*worker_flags(redis_url, six_adapters, s3_bucket.uri, "--idle", "0.2", *ONE_PER_CALL))
    storage = open_storage(s3_bucket.uri)
    wait_settled(storage, "held", (j.job_id for j in jobs), timeout=120, broker_url=redis_url)
    _assert_each_once_with_the_right_bytes(storage, jobs, six_adapters, tmp_path)


def _held_in_a_window(jobs, redis_url, redis, start_worker, adapters, out: str, *extra: str):
    """Submit the jobs to a worker that never runs a group: each waits in its window, reserved."""
    with Client(redis_url) as client:
        client.submit_many(jobs)
    worker = start_worker(*worker_flags(redis_url, adapters, out, "--idle", "3600", *extra))
    wait_for(
        lambda: redis.hlen("unacked") == len(jobs) and not queued_messages(redis),
        f"all {len(jobs)} reserved",
    )
    return worker


# The time-compressed lease test: 30 timeouts, as 30 minutes are at the shipped 60 s.
LEASE_TIMEOUT_S = 2
TIMEOUTS_HELD = 30


def test_a_job_held_many_timeouts_long_by_a_live_worker_is_never_redelivered(
    redis_url, redis_server, s3_bucket, six_adapters, start_worker, monkeypatch, tmp_path
):
    monkeypatch.setenv("OMNI_VISIBILITY_TIMEOUT", str(LEASE_TIMEOUT_S))
    # Compressed too: a consumer silent for a second counts as stuck, so this also shows that a
    # live one, holding jobs it does not run, keeps showing it is working.
    monkeypatch.setenv("OMNI_STUCK_AFTER", "1")
    jobs = _jobs("leased", 5)
    redis = redis_server.client()
    debug = ("--loglevel", "DEBUG")
    holder = _held_in_a_window(jobs, redis_url, redis, start_worker, six_adapters, s3_bucket.uri, *debug)
    taken_at = {tag: score for tag, score in redis.zrange("unacked_index", 0, -1, withscores=True)}

    def held_long_enough() -> bool:
        # Any worker's sweep (the holder's own runs every second) would put back a lease left
        # unrenewed for a timeout, and the holder would take that job again at once.
        assert "delivered again while held" not in holder.log, "a held job was redelivered"
        assert not queued_messages(redis), "a held job went back to the queue"
        leases = dict(redis.zrange("unacked_index", 0, -1, withscores=True))
        assert leases.keys() == taken_at.keys(), "the reserved jobs changed"
        return min(leases[tag] - taken_at[tag] for tag in leases) >= TIMEOUTS_HELD * LEASE_TIMEOUT_S

    wait_for(held_long_enough, f"leases renewed for {TIMEOUTS_HELD} timeouts", timeout=600)
    assert holder.stop(signal.SIGTERM) == 0  # a warm shutdown puts the held jobs back at once

    start_worker(*worker_flags(redis_url, six_adapters, s3_bucket.uri, "--idle", "0.2", *ONE_PER_CALL))
    storage = open_storage(s3_bucket.uri)
    wait_settled(storage, "leased", (j.job_id for j in jobs), broker_url=redis_url)
    _assert_each_once_with_the_right_bytes(storage, jobs, six_adapters, tmp_path)


def test_a_stuck_consumer_s_held_jobs_go_back_to_the_queue_and_finish_elsewhere(
    redis_url, redis_server, s3_bucket, six_adapters, start_worker, monkeypatch
):
    # Time compressed: a consumer silent for 1 s counts as stuck (the default is 30 minutes), and
    # a lease lapses after 3 s. What keeps the consumer silent is one long call (a base-model job
    # of many steps, seconds on any machine here), run first as the cheapest and most urgent group,
    # while four light jobs wait in the same window. It travels on a queue of its own, sent through
    # the Celery app as a foreign client would, so no other worker runs it.
    monkeypatch.setenv("OMNI_VISIBILITY_TIMEOUT", "3")
    heavy = validate_job(
        {"prompt": "long", "dataset": "stuck", "priority": 9, "steps": 150, "width": 64, "height": 64}
    )
    light = _jobs("stuck", 4)
    redis = redis_server.client()
    with Client(redis_url) as client:
        client.submit_many(light)
        client.app.send_task(d.TASK_NAME, args=[heavy.wire_dict()], task_id=heavy.job_id, queue="slow")
    flags = ("--idle", "0.2", *ONE_PER_CALL, "--no-affinity", "--loglevel", "DEBUG")
    own = ("--queues", f"{d.QUEUE},slow", "--stuck-after", "1")
    stuck = start_worker(*worker_flags(redis_url, six_adapters, s3_bucket.uri, *flags, *own))
    wait_for(lambda: "running 1 job(s) for None" in stuck.log, "the long call to start")

    def lapsed() -> list[bytes]:
        now = float(redis.time()[0])
        leases = redis.zrange("unacked_index", 0, -1, withscores=True)
        return [tag for tag, score in leases if score < now - 3]

    # A live worker renews every lease five times a timeout; this one has stopped, and says why.
    wait_for(lambda: len(lapsed()) == 5, "all five leases left to lapse")
    assert "no longer renewed" in stuck.log
    # Any worker's sweep now puts them back (here the sweep's own code, run by the test).
    with reserved_restorer(redis_url) as restore:
        for tag in lapsed():
            restore(tag.decode())
    assert len(queued_messages(redis)) == len(light), "every job it held is back in its queue"
    assert len(queued_messages(redis, "slow")) == 1
    assert stuck.log.count("running 1 job(s)") == 1, "while it was still in its long call"

    stuck.stop(signal.SIGKILL)  # what a supervisor does with a stuck worker
    start_worker(*worker_flags(redis_url, six_adapters, s3_bucket.uri, *flags))
    storage = open_storage(s3_bucket.uri)
    wait_settled(storage, "stuck", (j.job_id for j in light), broker_url=redis_url)
    images = [k for k in storage.list_keys("stuck/") if k.endswith(layout.IMAGE_SUFFIX)]
    assert len(images) == len(light), "the light jobs done once each; the long one waits on its queue"


def _worker_holding_five(broker, dataset, s3_bucket, six_adapters, start_worker, *flags: str):
    """A worker holding 5 jobs reserved and buffered; never idle long enough to start a group."""
    with Client(broker.url) as client:
        client.submit_many(_jobs(dataset, 5))
    worker = start_worker(*worker_flags(broker.url, six_adapters, s3_bucket.uri, "--idle", "3600", *flags))
    wait_for_counts(broker, lambda ready, unacked: (ready, unacked) == (0, 5), "all 5 reserved", timeout=120)
    return worker


def _wait_all_five_queued(broker) -> None:
    wait_for_counts(
        broker, lambda ready, unacked: (ready, unacked) == (5, 0), "the jobs back in the queue", timeout=15
    )


def test_warm_shutdown_returns_buffered_jobs_at_once(broker, s3_bucket, six_adapters, start_worker):
    worker = _worker_holding_five(broker, "buffered", s3_bucket, six_adapters, start_worker)
    assert worker.stop(signal.SIGTERM) == 0
    # Redis's visibility timeout is 60 s here: only the shutdown can have put them back so soon.
    _wait_all_five_queued(broker)
    assert not any(storage_key.endswith(".png") for storage_key in open_storage(s3_bucket.uri).list_keys())


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_rabbitmq_returns_a_killed_workers_jobs_at_once(broker, s3_bucket, six_adapters, start_worker):
    worker = _worker_holding_five(broker, "returned", s3_bucket, six_adapters, start_worker)
    worker.stop(signal.SIGKILL)
    # No visibility timeout: the closed connection alone puts them back.
    _wait_all_five_queued(broker)


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_rabbitmq_returns_a_frozen_workers_jobs_after_the_heartbeat_timeout(
    broker, s3_bucket, six_adapters, start_worker
):
    # A host that vanishes without closing its sockets (a preempted VM) looks like this to RabbitMQ:
    # a connection that stays open and says nothing. Time compressed: a 2 s heartbeat timeout.
    flags = ("--broker-heartbeat", "2")
    worker = _worker_holding_five(broker, "vanished", s3_bucket, six_adapters, start_worker, *flags)
    worker.proc.send_signal(signal.SIGSTOP)
    try:
        _wait_all_five_queued(broker)
    finally:
        worker.proc.send_signal(signal.SIGCONT)


HEARTBEAT_S = 1
# Celery's log time stamp, and how soon after a call the event loop finds a connection it closed.
LOG_TIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
AFTER_CALL = timedelta(seconds=10)


def _logged_at(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_a_call_longer_than_the_heartbeat_timeout_keeps_the_rabbitmq_connection(
    broker, s3_bucket, six_adapters, start_worker
):
    # Time compressed: a 1 s heartbeat timeout (60 s shipped) against one call of many steps
    # (seconds on an idle machine here, a minute beside two CPU hogs), the size of a large model's
    # batch against the shipped one. Four light jobs wait in the window meanwhile: a closed
    # connection would requeue them.
    heavy = validate_job({"prompt": "long", "dataset": "heartbeat", "steps": 60, "width": 64, "height": 64})
    jobs = [heavy, *_jobs("heartbeat", 4)]
    with Client(broker.url) as client:
        client.submit_many(jobs)
    flags = (*ONE_PER_CALL, "--broker-heartbeat", str(HEARTBEAT_S))
    worker = start_worker(*worker_flags(broker.url, six_adapters, s3_bucket.uri, *flags))
    storage = open_storage(s3_bucket.uri)
    # Beside two hogs and a benchmark the call alone has taken over the usual 300 s: allow twice that.
    job_ids = [j.job_id for j in jobs]
    wait_settled(
        storage, "heartbeat", job_ids, worker=worker, broker_url=broker.url, timeout=2 * DONE_TIMEOUT_S
    )
    call = re.search(
        rf"^\[{LOG_TIME}: INFO/MainProcess\] group adapter=- jobs=1 source=- seconds=([0-9.]+)",
        worker.log,
        re.M,
    )
    call_s, ended = float(call[2]), _logged_at(call[1])
    assert call_s > 3 * HEARTBEAT_S, "the call outlasted the heartbeat timeout, or this test proves nothing"
    # A loss the call caused shows once the call returns. (One at start, while Celery's own boot
    # steps hold the thread longer than this short timeout on a loaded machine, is not the call's.)
    lost = re.findall(
        rf"^\[{LOG_TIME}: WARNING/MainProcess\] consumer: Connection to broker lost", worker.log, re.M
    )
    during = [
        t for t in map(_logged_at, lost) if ended - timedelta(seconds=call_s) <= t <= ended + AFTER_CALL
    ]
    assert not during, worker.log[-4000:]
    images = [k for k in storage.list_keys("heartbeat/") if k.endswith(layout.IMAGE_SUFFIX)]
    assert len(images) == len(jobs)


def test_broker_restart_with_persistence_keeps_queued_jobs_and_workers_reconnect(
    restartable_broker, s3_bucket, six_adapters, start_worker, short_visibility, tmp_path
):
    broker = restartable_broker
    jobs = _jobs("restart", 12)
    with Client(broker.url) as client:
        client.submit_many(jobs)
    broker.kill()
    # While the broker is down a producer gets a clear error, never a silent loss.
    with Client(broker.url) as client, pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1"):
        client.submit_many(_jobs("restart-late", 1))
    broker.start()
    assert broker.counts() == (12, 0), "the broker's persistence kept the queue"

    storage = open_storage(s3_bucket.uri)
    start_worker(*worker_flags(broker.url, six_adapters, s3_bucket.uri, "--idle", "0.2", *ONE_PER_CALL))
    wait_for(lambda: any(k.endswith(".json") for k in storage.list_keys("restart/")), "a first sidecar")
    broker.kill()
    broker.start()  # same port: the worker reconnects on its own
    wait_settled(storage, "restart", (j.job_id for j in jobs), broker_url=broker.url)
    _assert_each_once_with_the_right_bytes(storage, jobs, six_adapters, tmp_path)


def test_s3_outage_is_waited_out_without_regenerating(
    broker, six_adapters, start_worker, s3_server, monkeypatch
):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    s3.start()
    # moto keeps buckets per process: a bucket of its own, or another broker's run left the outputs.
    bucket = f"outage-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    s3.stop()

    jobs = _jobs("outage", 4)
    with Client(broker.url) as client:
        client.submit_many(jobs)
    out = f"s3://{bucket}/out"
    flags = worker_flags(broker.url, six_adapters, out, "--idle", "0.2", "--loglevel", "DEBUG")
    monkeypatch.setenv("OMNI_S3_ENDPOINT_URL", endpoint)
    worker = start_worker(*flags)
    wait_for(lambda: "retry" in worker.log, "a failed store and its retry")
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    s3.start()
    try:
        wait_settled(
            open_storage(out, endpoint_url=endpoint),
            "outage",
            (j.job_id for j in jobs),
            broker_url=broker.url,
        )
    finally:
        s3.stop()
    runs = sum(int(n) for n in re.findall(r"running (\d+) job\(s\)", worker.log))
    assert runs == len(jobs), f"{runs} generations for {len(jobs)} jobs: some were generated again"


def _install_hook(source: str, monkeypatch, tmp_path) -> None:
    """`source` as the `sitecustomize` of every worker the test starts."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(source)
    # Before the tree's own path, if any: the worker must run this tree's code, not an installed one.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))


CRASH_HOOK = textwrap.dedent(
    """
    # Test-only: a GPU driver crash cannot be produced on purpose, so a job whose prompt says so
    # kills its worker process with SIGKILL, as a segfault would. Storing is slowed, as a distant
    # bucket would be, so other jobs' outcomes are still in flight when that job runs.
    import os, signal, time
    from omni_engine import engine
    from worker import execute

    _generate = engine.Omni.generate
    _store_with_retry = execute.store_with_retry

    def generate(self, prompt, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if any("crash the worker" in p for p in prompts):
            os.kill(os.getpid(), signal.SIGKILL)
        return _generate(self, prompt, **kwargs)

    def store_with_retry(result, **kwargs):
        time.sleep(0.5)
        return _store_with_retry(result, **kwargs)

    engine.Omni.generate = generate
    execute.store_with_retry = store_with_retry
    """
)


def test_a_poison_job_is_failed_after_a_bound_and_the_rest_complete(
    broker, redis_url, s3_bucket, six_adapters, start_worker, short_visibility, monkeypatch, tmp_path
):
    if broker.kind == "amqp":  # RabbitMQ has nowhere to count starts: a Redis result backend does
        monkeypatch.setenv("OMNI_RESULT_BACKEND", redis_url)
    _install_hook(CRASH_HOOK, monkeypatch, tmp_path)
    monkeypatch.setenv("OMNI_MAX_ATTEMPTS", "2")
    poison = validate_job({"prompt": "please crash the worker", "dataset": "poison"})
    good = [validate_job({"prompt": f"fine {i}", "dataset": "poison"}) for i in range(3)]
    with Client(broker.url) as client:  # the good jobs first: they may run before it, after a crash too
        client.submit_many(good)
        client.submit(poison)

    storage = open_storage(s3_bucket.uri)
    expected = frozenset(j.job_id for j in [poison, *good])

    def settled() -> bool:
        return {
            layout.classify_key(k).job_id for k in storage.list_keys("poison/") if k.endswith(".json")
        } >= expected

    crashes = 0
    while True:
        worker = start_worker(*worker_flags(broker.url, six_adapters, s3_bucket.uri, "--idle", "0.2"))
        wait_for(lambda w=worker: w.proc.poll() is not None or settled(), "a crash or every job settled", 180)
        if worker.proc.poll() is None:
            break
        crashes += 1
        assert crashes <= 5, "the poison job was redelivered without bound"
    assert crashes == 2, "one crash per start, up to the bound of 2 starts"

    record = json.loads(storage.get_bytes(layout.error_key("poison", poison.job_id)))
    assert record["error_type"] == "PoisonJobError" and "not run again" in record["error"]
    for job in good:
        error_key = layout.error_key("poison", job.job_id)
        why = storage.get_bytes(error_key).decode() if storage.exists(error_key) else "no error record"
        assert storage.exists(layout.sidecar_key("poison", job.job_id)), (
            f"{job.prompt!r}: {why}\n{worker.log[-6000:]}"
        )


DEVICE_LOSS_HOOK = textwrap.dedent(
    """
    # Test-only: a CUDA error that leaves the device unusable (an illegal memory access, a
    # device-side assert) cannot happen on this CPU machine, so the first call that holds a job
    # whose prompt says so raises the error torch raises then. Once: the marker file says it happened.
    import os, torch
    from omni_engine import engine

    _generate = engine.Omni.generate

    def generate(self, prompt, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        marker = os.environ["OMNI_TEST_DEVICE_LOST_MARKER"]
        if any("lose the device" in p for p in prompts) and not os.path.exists(marker):
            open(marker, "w").close()
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered (simulated)")
        return _generate(self, prompt, **kwargs)

    engine.Omni.generate = generate
    """
)


@pytest.mark.parametrize("started_before", [False, True], ids=["one-batch", "started-before"])
def test_a_failed_device_stops_the_worker_and_its_jobs_finish_on_the_next_unfailed(
    broker,
    redis_url,
    s3_bucket,
    six_adapters,
    start_worker,
    shipped_defaults,
    monkeypatch,
    tmp_path,
    started_before,
):
    _install_hook(DEVICE_LOSS_HOOK, monkeypatch, tmp_path)
    monkeypatch.setenv("OMNI_TEST_DEVICE_LOST_MARKER", str(tmp_path / "device-lost"))
    if broker.kind == "amqp":  # RabbitMQ has nowhere to count starts: a Redis result backend does
        monkeypatch.setenv("OMNI_RESULT_BACKEND", redis_url)
    starts = redis.Redis.from_url(redis_url if broker.kind == "amqp" else broker.url)
    jobs = [
        validate_job({"prompt": f"device {i}" + (", lose the device" if i == 2 else ""), "dataset": "device",
                      "adapter": ADAPTERS[0]})
        for i in range(5)
    ]  # fmt: skip
    lost = jobs[2]
    if started_before:  # each was started once by a worker that died: they run one by one
        starts.mset({d.ATTEMPTS_KEY_PREFIX + job.job_id: 1 for job in jobs})
    with Client(broker.url) as client:
        client.submit_many(jobs)
    storage = open_storage(s3_bucket.uri)

    first = start_worker(*worker_flags(broker.url, six_adapters, s3_bucket.uri))
    wait_for(lambda: first.proc.poll() is not None, "the worker to stop once its device failed", 120)
    assert first.proc.returncode == 1, first.log[-6000:]
    assert "the device failed: AcceleratorError: CUDA error" in first.log, first.log[-6000:]
    # Not the jobs' fault: none is failed, and each one not done is back in the queue, put back by
    # the worker itself (not by the warm stop's restore of what it still held) and at once (on Redis,
    # the shipped 60 s visibility timeout has not passed).
    assert not [k for k in storage.list_keys("device/") if k.endswith(layout.ERROR_SUFFIX)]
    left = [j for j in jobs if not storage.exists(layout.sidecar_key("device", j.job_id))]
    assert lost in left
    assert f"{len(left)} job(s) back to the queue, not run: the device failed" in first.log, first.log[-6000:]
    assert "unacknowledged message" not in first.log, first.log[-6000:]
    wait_for_counts(
        broker, lambda ready, unacked: (ready, unacked) == (len(left), 0), "the jobs back", timeout=15
    )
    # Nothing ran after the failure: no job left counts a start it did not make.
    counts = {j.job_id: int(starts.get(d.ATTEMPTS_KEY_PREFIX + j.job_id) or 0) for j in left}
    if started_before:  # one by one: only the job that broke the device was started again
        assert counts == {j.job_id: 1 + (j is lost) for j in left}
    else:  # the failed call's jobs were started once, any others in the window not at all
        assert counts[lost.job_id] == 1 and set(counts.values()) <= {0, 1}

    second = start_worker(*worker_flags(broker.url, six_adapters, s3_bucket.uri))
    status = wait_settled(storage, "device", [j.job_id for j in jobs], worker=second, broker_url=broker.url)
    assert (status.done, status.failed) == (len(jobs), 0)


def _freeze_while_blocked(worker, redis) -> None:
    """SIGSTOP the worker, at a moment when one of its commands blocks in Redis if it ever does."""
    for _ in range(50):
        worker.proc.send_signal(signal.SIGSTOP)
        if any("b" in client["flags"] for client in redis.client_list()):
            return
        worker.proc.send_signal(signal.SIGCONT)


def test_a_job_restored_while_its_worker_is_frozen_is_not_lost_when_it_dies(
    redis_url, redis_server, s3_bucket, six_adapters, start_worker, short_visibility, tmp_path
):
    # The race of kombu's BRPOP take (docs/reliability.md): a worker waiting in a blocking pop is
    # frozen (SIGSTOP, as a loaded machine or a long generation would hold it), a message goes back
    # to the queue (the visibility sweep's own restore), and the worker is killed. A pop that Redis
    # served but the worker never recorded would leave the job in no list and not in unacked.
    jobs = _jobs("frozen", 3)
    redis = redis_server.client()
    holder = _held_in_a_window(jobs, redis_url, redis, start_worker, six_adapters, s3_bucket.uri)
    tag = redis.hkeys("unacked")[0].decode()
    with reserved_restorer(redis_url) as restore:
        _freeze_while_blocked(holder, redis)
        restore(tag)
    holder.stop(signal.SIGKILL)

    start_worker(*worker_flags(redis_url, six_adapters, s3_bucket.uri, "--idle", "0.2", *ONE_PER_CALL))
    storage = open_storage(s3_bucket.uri)
    wait_settled(storage, "frozen", (j.job_id for j in jobs), timeout=90, broker_url=redis_url)
    _assert_each_once_with_the_right_bytes(storage, jobs, six_adapters, tmp_path)
