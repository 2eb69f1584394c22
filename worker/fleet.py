"""A worker's part in adapter affinity: its heartbeat, the coordinator's plan, the queues it follows.

Every worker on a Redis broker runs a `FleetMember` thread that ticks every `TICK_S`:

1. **Heartbeat.** It stamps itself in `omni:fleet:workers` (a sorted set scored by Redis's clock)
   and writes the shards of the adapters it ran last (what its host cache likely holds) and
   whether its window is empty under `omni:fleet:held:<worker>`, with an expiry.
2. **Coordinator.** Whichever worker holds `omni:fleet:lock` (set if absent, renewed by its holder
   with a compare-and-set, expiring when it dies) plans: every `replan_s`, at once when a producer
   announced jobs on shard queues, and when a worker sits idle while a shard has a backlog. From
   the live workers, each shard's rate (jobs taken, counted by workers in `omni:fleet:taken`) and
   backlog (every shard queue's lists, summed by one server-side script), it calls
   `worker.affinity.plan` and writes each busy shard's owners to `omni:fleet:plan`, with an expiry
   of a few plans: while it exists producers route, so when no coordinator is left they stop.
3. **Follow.** It reads the plan and publishes the shard queues this worker should consume
   besides its `--queues`. The consumer's thread applies them (`consumer.add_task_queue`,
   `cancel_task_queue`), since kombu's channel is not thread-safe; cancelling a queue stops new
   takes only, and jobs already reserved stay leased and are acked as any.

An idle worker's heartbeat says so, and while a shard has a backlog the next plan is made at
once; the plan's band may give the idle worker a share (a hot shard gets several owners, who all
take from its one queue). When that plan moves nothing, idleness alone stops triggering plans, so
a worker can idle while another's shard has a backlog: stealing (`worker.stealing.steal_target`)
is not wired in. A dead worker's stamp ages out after `heartbeat_ttl_s`, and the next plan gives
its shards to others; its reserved jobs come back to their shard queues after the visibility
timeout, as on `omni`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

import redis

from producer import defaults as d
from producer.routing import adapter_shard
from worker import metrics
from worker.affinity import (
    AffinityPolicy,
    ArrivalRates,
    Assignment,
    Rendezvous,
    ShardLoad,
    plan,
    shard_demand,
)
from worker.redis_transport import priority_list_key

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

logger = logging.getLogger("omni.worker")

WORKERS_KEY = d.FLEET_KEY_PREFIX + "workers"
HELD_KEY_PREFIX = d.FLEET_KEY_PREFIX + "held:"
LOCK_KEY = d.FLEET_KEY_PREFIX + "lock"
TAKEN_KEY = d.FLEET_KEY_PREFIX + "taken"
RATES_KEY = d.FLEET_KEY_PREFIX + "rates"

# How often a member beats, follows the plan and (as coordinator) looks for news.
TICK_S = 1.0
# Plans made on news or on an idle worker are at least this far apart: a sweep of every shard
# queue costs Redis tens of milliseconds.
MIN_REPLAN_S = 2.0
# The plan expires after this many replan intervals without a coordinator.
PLAN_LIFETIMES = 3
# Rates outlive any coordinator's death; a day is far past their half-life.
RATES_TTL_S = 24 * 3600

# KEYS: workers, held. ARGV: worker, held JSON, ttl ms. Stamps the worker with Redis's clock.
_BEAT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1e6, ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
"""
# KEYS: workers. ARGV: ttl s. Forgets stale workers; returns Redis's time and the live ones.
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
return {tostring(now), redis.call('ZRANGE', KEYS[1], 0, -1)}
"""
# KEYS: lock. ARGV: worker, ttl ms. 1 if the worker holds the lock now (taken or renewed).
_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# ARGV: the shard queue prefix, the number of shards, then each priority list's suffix. Returns
# (shard, jobs) pairs for the shards with jobs queued. The list names are built here, not passed
# as KEYS (2,048 x 10 of them): fine on one Redis, which is what kombu's transport runs on.
_BACKLOG = """
local out = {}
for s = 0, tonumber(ARGV[2]) - 1 do
  local n = 0
  for i = 3, #ARGV do n = n + redis.call('LLEN', ARGV[1] .. s .. ARGV[i]) end
  if n > 0 then out[#out + 1] = s; out[#out + 1] = n end
end
return out
"""


def _beat(raw: bytes) -> dict[str, Any]:
    """A heartbeat's content; an unreadable one (another version) says nothing."""
    try:
        beat = json.loads(raw)
        held = [int(s) for s in beat.get("held", [])]
        return {"held": held, "idle": bool(beat.get("idle"))}
    except (TypeError, ValueError, AttributeError):
        return {}


def encode_plan(version: int, assignment: Assignment, shards: Iterable[int]) -> str:
    """The plan as stored: its version and the owners of `shards` (those with demand)."""
    owners = {str(s): list(assignment.owners[s]) for s in sorted(shards)}
    return json.dumps({"version": version, "owners": owners}, separators=(",", ":"))


def decode_plan(raw: bytes | str | None) -> tuple[int, Assignment]:
    """(version, owners) of a stored plan; (0, no owners) when there is none or it is unreadable."""
    if raw is None:
        return 0, Assignment()
    try:
        data = json.loads(raw)
        owners = {int(s): tuple(str(w) for w in ws) for s, ws in data["owners"].items()}
        return int(data["version"]), Assignment(owners)
    except (KeyError, TypeError, ValueError, AttributeError):
        logger.warning("ignored an unreadable fleet plan: %.200r", raw)
        return 0, Assignment()


class FleetMember:
    """One worker's heartbeat, its turn as coordinator, and the queues the plan gives it."""

    def __init__(
        self,
        client: redis.Redis,
        worker: str,
        *,
        policy: AffinityPolicy,
        min_replan_s: float = MIN_REPLAN_S,
    ) -> None:
        self.redis = client
        self.worker = worker
        self.policy = policy
        self.min_replan_s = min_replan_s
        self._suffixes = [priority_list_key("", p) for p in d.BROKER_PRIORITY_STEPS]
        self._scripts = {name: client.register_script(s) for name, s in _SCRIPTS.items()}
        self._lock = threading.Lock()
        self._taken: Counter[int] = Counter()
        self._ran: OrderedDict[int, None] = OrderedDict()  # shards of the adapters run last
        self._idle = True
        self._queues: tuple[str, ...] = (d.QUEUE,)
        self._rates: ArrivalRates | None = None
        self._rates_at = 0.0
        self._last_plan = -float("inf")
        self._backlog = 0
        self._settled = False  # the last plan changed no owner: an idle worker alone does not replan
        self._redis_down = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="omni-fleet", daemon=True)

    # -- what the consumer tells and asks (any thread) -----------------------------------------

    def start(self) -> None:
        self._thread.start()

    def taken(self, adapter: str | None) -> None:
        """A job for `adapter` was taken: counted towards its shard's rate."""
        if adapter:
            with self._lock:
                self._taken[adapter_shard(adapter, self.policy.shards)] += 1

    def ran(self, adapters: Iterable[str | None], *, idle: bool) -> None:
        """The adapters of the group just run, and whether the window is empty now."""
        with self._lock:
            for adapter in adapters:
                if adapter:
                    shard = adapter_shard(adapter, self.policy.shards)
                    self._ran[shard] = None
                    self._ran.move_to_end(shard)
            while len(self._ran) > self.policy.held_adapters:
                self._ran.popitem(last=False)
            self._idle = idle

    @property
    def queues(self) -> tuple[str, ...]:
        """What this worker should consume now: `omni`, then its shards' queues."""
        return self._queues

    def stop(self) -> None:
        """Leave the fleet at once (a clean stop): the next plan, made now, gives its shards away."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=TICK_S * 5)
        try:
            with self.redis.pipeline() as pipe:
                pipe.zrem(WORKERS_KEY, self.worker).delete(HELD_KEY_PREFIX + self.worker)
                pipe.set(d.FLEET_NEWS_KEY, 1)
                pipe.execute()
            self._scripts["unlock"](keys=[LOCK_KEY], args=[self.worker])
        except redis.RedisError as e:
            logger.warning("fleet: could not leave cleanly (%s); the heartbeat expires instead", e)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except redis.RedisError as e:
                if not self._redis_down:  # once per outage, not every tick
                    logger.warning("fleet: Redis did not answer (%s); jobs go on from the queues followed", e)
                self._redis_down = True
            except Exception:  # the heartbeat must outlive any one bad plan
                logger.exception("fleet: unexpected error")
            self._stop.wait(TICK_S)

    def tick(self) -> None:
        """Beat, plan if this worker coordinates and a plan is due, then read the plan."""
        with self._lock:
            held, idle, taken = list(self._ran), self._idle, dict(self._taken)
            self._taken.clear()
        ttl_ms = int(self.policy.heartbeat_ttl_s * 1000)
        beat = json.dumps({"held": held, "idle": idle})
        with self.redis.pipeline() as pipe:
            for shard, count in taken.items():
                pipe.hincrby(TAKEN_KEY, str(shard), count)
            self._scripts["beat"](
                keys=[WORKERS_KEY, HELD_KEY_PREFIX + self.worker],
                args=[self.worker, beat, ttl_ms],
                client=pipe,
            )
            self._scripts["lock"](keys=[LOCK_KEY], args=[self.worker, ttl_ms], client=pipe)
            *_, coordinating = pipe.execute()
        self._redis_down = False
        raw = self.redis.get(d.FLEET_PLAN_KEY)
        if coordinating:
            try:
                raw = self._coordinate(raw) or raw
            except Exception:
                # Held by a coordinator that cannot plan, the lock would stop every plan for good.
                self._scripts["unlock"](keys=[LOCK_KEY], args=[self.worker])
                self._rates = None
                raise
        else:
            self._rates = None  # a later turn as coordinator resumes from Redis, not stale memory
        metrics.FLEET_COORDINATOR.set(1 if coordinating else 0)
        if raw is None:
            return  # no coordinator at the moment: keep serving the shards followed until one plans
        _, assignment = decode_plan(raw)
        self._queues = tuple(assignment.queues_of(self.worker))
        metrics.FLEET_SHARD_QUEUES.set(len(self._queues) - 1)

    def _coordinate(self, raw: bytes | None) -> str | None:
        """Plan when one is due; returns the new plan, or None if none was made."""
        now = time.monotonic()
        news = self.redis.getdel(d.FLEET_NEWS_KEY) is not None
        due = raw is None or now - self._last_plan >= self.policy.replan_s
        if not due and now - self._last_plan < self.min_replan_s:
            if news:
                self.redis.set(d.FLEET_NEWS_KEY, 1)  # kept for the next tick
            return None
        redis_now, live = self._scripts["live"](keys=[WORKERS_KEY], args=[self.policy.heartbeat_ttl_s])
        live = [w.decode() for w in live]
        beats = dict(zip(live, self.redis.mget([HELD_KEY_PREFIX + w for w in live]), strict=True))
        heard = {w: _beat(b) for w, b in beats.items() if b is not None}
        someone_idle = any(h.get("idle") for h in heard.values())
        if not (due or news or (someone_idle and self._backlog and not self._settled)):
            return None
        if not live:
            return None
        self._last_plan = now
        backlog = self._read_backlog()
        self._backlog = sum(backlog.values())
        rates = self._advance_rates(float(redis_now))
        loads = {}
        for shard in set(backlog) | set(rates.jobs):
            demand = shard_demand(rates.per_second(shard), backlog.get(shard, 0), policy=self.policy)
            if demand > 0:
                loads[shard] = ShardLoad(demand)
        version, previous = decode_plan(raw)
        held = {w: h.get("held", []) for w, h in heard.items()}
        assignment = plan(loads, Rendezvous(live), previous=previous, held=held, policy=self.policy)
        self._settled = {s: assignment.owners[s] for s in loads} == dict(previous.owners)
        encoded = encode_plan(version + 1, assignment, loads)
        ttl_ms = int(self.policy.replan_s * PLAN_LIFETIMES * 1000)
        self.redis.set(d.FLEET_PLAN_KEY, encoded, px=ttl_ms)
        logger.debug("fleet: plan %d for %d worker(s), %d busy shard(s)", version + 1, len(live), len(loads))
        return encoded

    def _read_backlog(self) -> dict[int, int]:
        reply = self._scripts["backlog"](args=[d.SHARD_QUEUE_PREFIX, self.policy.shards, *self._suffixes])
        return {int(reply[i]): int(reply[i + 1]) for i in range(0, len(reply), 2)}

    def _advance_rates(self, redis_now: float) -> ArrivalRates:
        """Each shard's rate, advanced by the jobs workers counted since the last plan."""
        if self._rates is None:  # a new coordinator resumes from the last one's rates
            self._rates = ArrivalRates(self.policy.rate_half_life_s)
            self._rates_at = redis_now
            saved = self.redis.get(RATES_KEY)
            if saved is not None:
                data = json.loads(saved)
                self._rates.seconds = float(data["seconds"])
                jobs = {int(s): float(n) for s, n in data["jobs"].items()}
                self._rates.jobs = {s: n for s, n in jobs.items() if 0 <= s < self.policy.shards}
                self._rates_at = float(data["at"])
        with self.redis.pipeline() as pipe:  # read and cleared in one transaction
            pipe.hgetall(TAKEN_KEY).delete(TAKEN_KEY)
            counted, _ = pipe.execute()
        elapsed = max(redis_now - self._rates_at, 1e-3)
        counts = {int(s): int(n) for s, n in counted.items()}
        self._rates.advance(elapsed, {s: n for s, n in counts.items() if 0 <= s < self.policy.shards})
        self._rates_at = redis_now
        saved = {"seconds": self._rates.seconds, "jobs": self._rates.jobs, "at": redis_now}
        self.redis.set(RATES_KEY, json.dumps(saved), ex=RATES_TTL_S)
        return self._rates


_SCRIPTS = {"beat": _BEAT, "live": _LIVE, "lock": _LOCK, "unlock": _UNLOCK, "backlog": _BACKLOG}


def join_fleet(settings: WorkerSettings, worker: str) -> FleetMember:
    """Start `worker`'s part in the fleet on the broker's Redis; it leaves with `FleetMember.stop`.

    Its name in the fleet carries the process id: workers of one host (one per GPU) often share a
    Celery node name, and two members of one name would both coordinate and take each other out.
    """
    member = FleetMember(
        redis.Redis.from_url(settings.broker_url, socket_timeout=10),
        f"{worker}#{os.getpid()}",
        policy=AffinityPolicy(held_adapters=settings.max_cpu_loras),
    )
    member.start()
    logger.info("fleet: %s follows adapter affinity (docs/scheduling.md)", member.worker)
    return member


def app_queues(app: Any) -> list[str]:
    """The queues a Celery app's worker was told to consume (`--queues`)."""
    return list(app.amqp.queues.consume_from)


def follow(consumer: Any, queues: Iterable[str], *, keep: Collection[str] = ()) -> bool:
    """On the consumer's thread: consume the plan's shard queues (start the new, cancel the
    dropped), never touching `keep`, the queues the operator named. False while the consumer has
    no connection to do it on (it is reconnecting)."""
    if consumer.task_consumer is None:
        return False
    wanted = {queue for queue in queues if queue.startswith(d.SHARD_QUEUE_PREFIX)}
    current = {queue.name for queue in consumer.task_consumer.queues}
    for queue in sorted(wanted - current):
        consumer.add_task_queue(queue)
    for queue in sorted(current - wanted - set(keep)):
        if queue.startswith(d.SHARD_QUEUE_PREFIX):
            consumer.cancel_task_queue(queue)
    return True
