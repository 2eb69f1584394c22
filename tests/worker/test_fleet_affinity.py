"""Adapter affinity on real parts: fleet members on a private redis-server, the producer's routing,
and three real `omni-batch worker` processes sharing a dataset's adapters out."""

from __future__ import annotations

import json
import signal

import redis
from fixtures.redis_server import KOMBU_PRIORITY_SEP, queued_messages
from fixtures.worker_process import wait_for, wait_settled, worker_flags

from producer import defaults as d
from producer import layout
from producer.client import Client
from producer.routing import adapter_shard, shard_queue
from producer.schema import validate_job
from producer.storage import open_storage
from worker.affinity import AffinityPolicy, lower_bound
from worker.fleet import LOCK_KEY, FleetMember, decode_plan


def _jobs(dataset: str, adapters: list[str], per_adapter: list[int], *, wave: int = 0) -> list:
    return [
        validate_job({"prompt": f"{name} {i} (wave {wave})", "adapter": name, "dataset": dataset})
        for name, count in zip(adapters, per_adapter, strict=True)
        for i in range(count)
    ]


def _member(redis_url: str, worker: str, **policy: float) -> FleetMember:
    """A member whose tick the test calls (no thread), planning whenever there is news."""
    return FleetMember(
        redis.Redis.from_url(redis_url), worker, policy=AffinityPolicy(**policy), min_replan_s=0.0
    )


def _queues_of(client: redis.Redis, dataset: str) -> set[str]:
    """The queues the jobs of `dataset` wait in."""
    return {
        m["key"].split(KOMBU_PRIORITY_SEP)[0]
        for m in queued_messages(client)
        if m["decoded_body"][0][0]["dataset"] == dataset
    }


def _plan(client: redis.Redis) -> dict[int, tuple[str, ...]]:
    return dict(decode_plan(client.get(d.FLEET_PLAN_KEY))[1].owners)


def test_producers_route_to_shard_queues_only_while_a_coordinator_keeps_a_plan(redis_url):
    client = redis.Redis.from_url(redis_url)
    names = [f"style-{i}" for i in range(6)]
    with Client(redis_url) as producer:
        producer.submit_many(_jobs("before", names, [1] * 6))
        assert _queues_of(client, "before") == {d.QUEUE}, "no fleet yet: all on omni"

        one, two = _member(redis_url, "one@test"), _member(redis_url, "two@test")
        one.tick()
        two.tick()
        assert client.get(LOCK_KEY) == b"one@test", "the first to ask coordinates"
        producer.submit_many(_jobs("after", names, [2] * 6))
    assert _queues_of(client, "after") == {shard_queue(adapter_shard(name)) for name in names}

    one.tick()  # the producer's news: a plan for every shard with a backlog, at once
    two.tick()
    owners = _plan(client)
    assert set(owners) == {adapter_shard(name) for name in names}
    assert {w for ws in owners.values() for w in ws} == {"one@test", "two@test"}, "both get shards"
    for member in (one, two):
        mine = {shard_queue(s) for s, ws in owners.items() if member.worker in ws}
        assert set(member.queues) == {d.QUEUE, *mine}, "each follows the plan; omni always"

    # The coordinator stops cleanly: the other takes over, plans at once, and owns everything.
    one.stop()
    two.tick()
    assert client.get(LOCK_KEY) == b"two@test"
    assert {w for ws in _plan(client).values() for w in ws} == {"two@test"}
    assert set(two.queues) == {d.QUEUE, *(shard_queue(adapter_shard(name)) for name in names)}


def test_without_a_coordinator_the_plan_expires_and_jobs_go_to_omni_again(redis_url):
    client = redis.Redis.from_url(redis_url)
    member = _member(redis_url, "gone@test", replan_s=0.2)
    member.tick()
    assert client.exists(d.FLEET_PLAN_KEY)
    wait_for(lambda: not client.exists(d.FLEET_PLAN_KEY), "the plan to expire")  # no tick: it died
    with Client(redis_url) as producer:
        producer.submit_many(_jobs("late", ["style-0"], [2]))
    assert _queues_of(client, "late") == {d.QUEUE}


# Each wave names every adapter, Zipf-skewed; waves are sent one after another, as a backend sends
# batches of a stream. Each worker holds 4 adapters in host memory: a third of them.
WAVE = [4, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
WAVES = 4
FLEET_FLAGS = ("--max-cpu-loras", "4", "--window", "16", "--idle", "0.3", "--mix-adapters", "1")


def _cold_loads(storage, jobs) -> int:
    """Engine calls that read an adapter's files: the jobs of one call share its timings."""
    sidecars = [json.loads(storage.get_bytes(layout.sidecar_key(j.dataset, j.job_id))) for j in jobs]
    calls = {
        (s["adapter_sha256"], s["timings"]["adapter_s"], s["timings"]["generate_s"]): s for s in sidecars
    }
    return sum(s["adapter_source"] == "disk" for s in calls.values())


def test_three_workers_load_each_adapter_about_once_and_finish_every_job(
    redis_url, s3_bucket, make_adapter, start_worker, tmp_path
):
    names = [f"a{i}" for i in range(len(WAVE))]
    for name in names:
        make_adapter(name)
    for i in range(3):
        flags = worker_flags(
            redis_url, tmp_path / "adapters", s3_bucket.uri, *FLEET_FLAGS, f"--hostname=w{i}@fleet"
        )
        start_worker(*flags)
    client = redis.Redis.from_url(redis_url)
    wait_for(lambda: client.exists(d.FLEET_PLAN_KEY), "the fleet's first plan")
    waves = [_jobs("fleet", names, WAVE, wave=wave) for wave in range(WAVES)]
    with Client(redis_url) as producer:
        for wave in waves:
            producer.submit_many(wave)
    jobs = [job for wave in waves for job in wave]

    storage = open_storage(s3_bucket.uri)
    status = wait_settled(storage, "fleet", (j.job_id for j in jobs), broker_url=redis_url)
    assert status.done == len(jobs) and status.failed == 0
    keys = set(storage.list_keys("fleet/"))
    assert len(keys) == 2 * len(jobs), "one image and one sidecar per job, nothing else"
    # On one queue each worker meets every adapter in every wave, more than its cache holds; each
    # following the plan meets only its own shards' adapters, about once each.
    bound = lower_bound([j.adapter for j in jobs], 3)
    assert _cold_loads(storage, jobs) <= 1.3 * bound, (_cold_loads(storage, jobs), bound)


def test_a_killed_worker_s_shards_and_reserved_jobs_finish_on_the_other(
    redis_url, s3_bucket, six_adapters, start_worker, monkeypatch
):
    # A short lease, so the test does not wait a minute; tests/worker/test_faults.py runs the
    # shipped default. The dead worker's heartbeat still takes its full 30 s to expire.
    monkeypatch.setenv("OMNI_VISIBILITY_TIMEOUT", "5")
    client = redis.Redis.from_url(redis_url)
    flags = (*FLEET_FLAGS, "--window=64", "--loglevel=DEBUG")
    out = s3_bucket.uri
    doomed = start_worker(
        *worker_flags(redis_url, six_adapters, out, *flags, "--idle=3600", "--hostname=doomed@fleet")
    )
    wait_for(lambda: client.exists(d.FLEET_PLAN_KEY), "the fleet's first plan")
    names = [f"style-{i}" for i in range(6)]
    jobs = _jobs("killed", names, [3] * 6)
    with Client(redis_url) as producer:
        producer.submit_many(jobs)
    # The only worker owns every shard and reserves every job; it never runs a group.
    wait_for(lambda: client.hlen("unacked") == len(jobs), f"all {len(jobs)} reserved")
    start_worker(*worker_flags(redis_url, six_adapters, out, *flags, "--hostname=heir@fleet"))
    doomed.stop(signal.SIGKILL)

    storage = open_storage(s3_bucket.uri)
    status = wait_settled(storage, "killed", (j.job_id for j in jobs), broker_url=redis_url)
    assert status.done == len(jobs) and status.failed == 0
    owners = {w.split("#")[0] for ws in _plan(client).values() for w in ws}  # node name#pid
    assert owners == {"heir@fleet"}, "the dead worker's shards moved"
