"""Adapter affinity on real parts: fleet members on a private redis-server, the producer's routing,
and three real `omni-batch worker` processes sharing a dataset's adapters out."""

from __future__ import annotations

import json
import re
import signal
from collections import Counter

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
from worker.fleet import LOCK_KEY, RATES_KEY, WORKERS_KEY, FleetMember, FleetPlan
from worker.leases import CONSUMER


def _jobs(dataset: str, adapters: list[str], per_adapter: list[int], *, wave: int = 0) -> list:
    return [
        validate_job({"prompt": f"{name} {i} (wave {wave})", "adapter": name, "dataset": dataset})
        for name, count in zip(adapters, per_adapter, strict=True)
        for i in range(count)
    ]


def _member(
    redis_url: str, worker: str, *, window: int = 64, stuck_after_s: float = 0, **policy: float
) -> FleetMember:
    """A member whose tick the test calls (no thread), planning whenever there is news."""
    return FleetMember(
        redis.Redis.from_url(redis_url),
        worker,
        policy=AffinityPolicy(**policy),
        window=window,
        stuck_after_s=stuck_after_s,
        min_replan_s=0.0,
    )


def _queues_of(client: redis.Redis, dataset: str) -> set[str]:
    """The queues the jobs of `dataset` wait in."""
    return {
        m["key"].split(KOMBU_PRIORITY_SEP)[0]
        for m in queued_messages(client)
        if m["decoded_body"][0][0]["dataset"] == dataset
    }


def _plan(client: redis.Redis) -> dict[int, tuple[str, ...]]:
    return dict(FleetPlan.decode(client.get(d.FLEET_PLAN_KEY)).assignment.owners)


def _steady_traffic(client: redis.Redis, names: list[str], per_second: float) -> None:
    """What the coordinator remembers of past traffic: each adapter's shard taken at `per_second`
    for the last ten minutes. A plan then shares the shards out evenly before any job is queued."""
    seconds = 600.0
    now, micros = client.time()
    jobs = {str(adapter_shard(name)): per_second * seconds for name in names}
    client.set(RATES_KEY, json.dumps({"seconds": seconds, "jobs": jobs, "at": now + micros / 1e6}))


def _owned(owners: dict[int, tuple[str, ...]], worker: str) -> set[int]:
    return {shard for shard, ws in owners.items() if worker in ws}


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


def test_an_idle_worker_steals_what_a_busy_owner_cannot_take_soon_and_no_more(redis_url):
    client = redis.Redis.from_url(redis_url)
    names = [f"style-{i}" for i in range(6)]
    assert len({adapter_shard(name) for name in names}) == 6
    _steady_traffic(client, names, per_second=1.0)
    one = _member(redis_url, "one@test", window=4)
    two = _member(redis_url, "two@test", window=4)
    for member in (one, two, one):
        member.tick()
    owners = _plan(client)
    assert len(_owned(owners, "one@test")) == len(_owned(owners, "two@test")) == 3, "even by traffic"
    hot = next(name for name in names if adapter_shard(name) in _owned(owners, "one@test"))

    # A burst for one of one's shards. one's window is full; two has nothing to do. The burst
    # leaves the plan inside its band, so only a steal gets two working.
    one.ran((), holding=4)
    two.ran((), holding=0)
    with Client(redis_url) as producer:
        producer.submit_many(_jobs("burst", [hot], [20]))
    one.tick()
    two.tick()
    assert _plan(client) == owners, "the band moved nothing"
    stolen = shard_queue(adapter_shard(hot))
    assert set(one.queues) == {d.QUEUE, *(shard_queue(s) for s in _owned(owners, "one@test"))}, (
        "busy: no steal"
    )
    assert stolen in two.queues, "the idle worker takes from the busy owner's queue"
    for _ in range(4):  # a window's room: less than one more owner's share of 20
        assert stolen in two.queues
        two.taken(hot)
    assert stolen not in two.queues, "and gives it up once it took what it was handed"
    assert set(two.queues) == {d.QUEUE, *(shard_queue(s) for s in _owned(owners, "two@test"))}


def test_a_backlog_its_owner_has_room_for_is_stolen_only_once_it_has_waited(redis_url):
    client = redis.Redis.from_url(redis_url)
    names = [f"style-{i}" for i in range(6)]
    _steady_traffic(client, names, per_second=1.0)
    one = _member(redis_url, "one@test", window=64, steal_after_s=1.0)
    two = _member(redis_url, "two@test", window=64, steal_after_s=1.0)
    for member in (one, two, one):
        member.tick()
    hot = next(name for name in names if adapter_shard(name) in _owned(_plan(client), "one@test"))
    stolen = shard_queue(adapter_shard(hot))
    one.ran((), holding=10)  # room for the backlog: it will take the jobs itself, unless it is stuck
    two.ran((), holding=0)
    with Client(redis_url) as producer:
        producer.submit_many(_jobs("stuck", [hot], [5]))
    one.tick()
    two.tick()
    assert stolen not in two.queues, "an owner with room takes its own jobs first"

    def stolen_once_old() -> bool:
        client.set(d.FLEET_NEWS_KEY, 1)  # a plan at every tick
        one.tick()
        two.tick()
        return stolen in two.queues

    wait_for(stolen_once_old, "the idle worker to steal the jobs the owner left for a second")


def test_a_member_whose_consumer_is_stuck_stops_beating_so_its_shards_move(redis_url):
    client = redis.Redis.from_url(redis_url)
    member = _member(redis_url, "hung@test", stuck_after_s=0.05)
    CONSUMER.beat()
    member.tick()
    assert client.zscore(WORKERS_KEY, "hung@test") is not None
    client.delete(WORKERS_KEY)
    wait_for(lambda: CONSUMER.stuck(0.05), "this process's consumer to be silent past the limit")
    member.tick()
    assert client.zscore(WORKERS_KEY, "hung@test") is None, "no heartbeat: the next plans leave it out"
    CONSUMER.beat()
    member.tick()
    assert client.zscore(WORKERS_KEY, "hung@test") is not None, "back once it works again"


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


def _ran(worker, adapter: str) -> int:
    """Jobs the worker's log says it ran for `adapter` (its groups' DEBUG lines)."""
    return sum(
        int(n) for n in re.findall(rf"running (\d+) job\(s\) for (?:\S*/)?{re.escape(adapter)};", worker.log)
    )


def test_a_real_idle_worker_steals_a_burst_its_busy_peer_owns(
    redis_url, s3_bucket, six_adapters, start_worker
):
    client = redis.Redis.from_url(redis_url)
    names = [f"style-{i}" for i in range(6)]
    _steady_traffic(client, names, per_second=1.0)
    flags = (*FLEET_FLAGS, "--loglevel=DEBUG")
    workers = {
        node: start_worker(
            *worker_flags(redis_url, six_adapters, s3_bucket.uri, *flags, f"--hostname={node}")
        )
        for node in ("w0@fleet", "w1@fleet")
    }

    def shared_evenly() -> bool:
        by_node = Counter(w.split("#")[0] for ws in _plan(client).values() for w in ws)
        return by_node == {"w0@fleet": 3, "w1@fleet": 3}

    wait_for(shared_evenly, "a plan giving each worker three of the six shards")
    owners = _plan(client)
    hot = names[0]
    owner = owners[adapter_shard(hot)][0].split("#")[0]
    thief = next(node for node in workers if node != owner)
    jobs = _jobs("burst", [hot], [60])
    with Client(redis_url) as producer:
        producer.submit_many(jobs)

    storage = open_storage(s3_bucket.uri)
    status = wait_settled(storage, "burst", (j.job_id for j in jobs), broker_url=redis_url)
    assert status.done == len(jobs) and status.failed == 0
    assert len(set(storage.list_keys("burst/"))) == 2 * len(jobs), "one image and one sidecar per job"
    assert _ran(workers[thief], hot) > 0, "the idle worker ran some of the burst its peer owns"
    assert "taking up to" in workers[thief].log, "as a steal the plan handed it"
    assert _ran(workers[owner], hot) > 0


def test_a_worker_without_affinity_runs_jobs_left_on_shard_queues_once_no_plan_is_left(
    redis_url, s3_bucket, six_adapters, start_worker
):
    client = redis.Redis.from_url(redis_url)
    last = _member(redis_url, "last@test", replan_s=0.2)
    last.tick()
    names = [f"style-{i}" for i in range(6)]
    jobs = _jobs("orphans", names, [2] * 6)
    with Client(redis_url) as producer:
        producer.submit_many(jobs)
    assert _queues_of(client, "orphans") == {shard_queue(adapter_shard(name)) for name in names}
    # The last worker with affinity is gone (no tick): its plan expires, and nobody owns the shards.
    wait_for(lambda: not client.exists(d.FLEET_PLAN_KEY), "the plan to expire")

    flags = worker_flags(redis_url, six_adapters, s3_bucket.uri, *FLEET_FLAGS, "--no-affinity")
    worker = start_worker(*flags)
    storage = open_storage(s3_bucket.uri)
    status = wait_settled(storage, "orphans", (j.job_id for j in jobs), worker=worker, broker_url=redis_url)
    assert status.done == len(jobs) and status.failed == 0
    assert not client.exists(d.FLEET_PLAN_KEY), "a worker without affinity never plans"
