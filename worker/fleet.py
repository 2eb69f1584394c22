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

4. **Steal.** An idle worker's heartbeat says so (and every heartbeat says how much room its
   window has), and while a shard has a backlog the next plan is made at once. Its band may give
   the idle worker owned work; whatever it gives, each idle worker is also handed one steal
   (`worker.stealing`): a busy shard queue whose owners cannot take its backlog soon (more jobs
   than their windows have room for, or an oldest job `steal_after_s` old), and how many jobs to
   take from it. The thief consumes that queue until it has taken them, or for `replan_s` at most.
   So no worker idles while another's shard has jobs its owners cannot get to.

A dead worker's stamp ages out after `heartbeat_ttl_s`, and the next plan gives its shards to
others; its reserved jobs come back to their shard queues after the visibility timeout, as on
`omni`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import redis

from producer import defaults as d
from producer.routing import adapter_shard, shard_queue
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
from worker.leases import CONSUMER
from worker.redis_transport import oldest_waits, priority_list_key
from worker.settings import DEFAULT_WINDOW
from worker.stealing import QueueState, steal_count, steal_target

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
        return {"held": held, "idle": bool(beat.get("idle")), "room": max(0, int(beat.get("room", 0)))}
    except (TypeError, ValueError, AttributeError):
        return {}


@dataclass(frozen=True)
class FleetPlan:
    """What the coordinator publishes: each busy shard's owners, and each idle worker's steal
    (shard -> how many jobs to take from its queue)."""

    version: int = 0
    assignment: Assignment = field(default_factory=Assignment)
    steals: Mapping[str, Mapping[int, int]] = field(default_factory=dict)

    def encode(self) -> str:
        owners = {str(s): list(ws) for s, ws in sorted(self.assignment.owners.items())}
        steals = {w: {str(s): n for s, n in taken.items()} for w, taken in sorted(self.steals.items())}
        data = {"version": self.version, "owners": owners, "steals": steals}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str | None) -> FleetPlan:
        """A stored plan; an empty one when there is none or it is unreadable (another version)."""
        if raw is None:
            return cls()
        try:
            data = json.loads(raw)
            owners = {int(s): tuple(str(w) for w in ws) for s, ws in data["owners"].items()}
            stolen = data.get("steals", {}).items()
            steals = {str(w): {int(s): int(n) for s, n in t.items()} for w, t in stolen}
            return cls(int(data["version"]), Assignment(owners), steals)
        except (KeyError, TypeError, ValueError, AttributeError):
            logger.warning("ignored an unreadable fleet plan: %.200r", raw)
            return cls()


class FleetMember:
    """One worker's heartbeat, its turn as coordinator, and the queues the plan gives it."""

    def __init__(
        self,
        client: redis.Redis,
        worker: str,
        *,
        policy: AffinityPolicy,
        window: int = DEFAULT_WINDOW,
        joins: bool = True,
        stuck_after_s: float = 0,
        min_replan_s: float = MIN_REPLAN_S,
    ) -> None:
        self.redis = client
        self.worker = worker
        self.policy = policy
        self.joins = joins
        self.stuck_after_s = stuck_after_s
        self.window = window
        self.min_replan_s = min_replan_s
        self._suffixes = [priority_list_key("", p) for p in d.BROKER_PRIORITY_STEPS]
        self._scripts = {name: client.register_script(s) for name, s in _SCRIPTS.items()}
        self._lock = threading.Lock()
        self._taken: Counter[int] = Counter()
        self._ran: OrderedDict[int, None] = OrderedDict()  # shards of the adapters run last
        self._holding = 0  # jobs in the window
        self._owned: tuple[str, ...] = (d.QUEUE,)
        self._plan_version = 0
        self._steals: dict[int, tuple[int, float]] = {}  # shard -> (jobs still to take, until when)
        self._rates: ArrivalRates | None = None
        self._rates_at = 0.0
        self._last_plan = -float("inf")
        self._backlog = 0
        self._settled = False  # the last plan changed no owner: an idle worker alone does not replan
        self._redis_down = False
        self._joined = False
        self._silent = False  # the consumer was stuck at the last tick: no heartbeat sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="omni-fleet", daemon=True)

    # -- what the consumer tells and asks (any thread) -----------------------------------------

    def start(self) -> None:
        self._thread.start()

    def taken(self, adapter: str | None) -> None:
        """A job for `adapter` was taken: counted towards its shard's rate and any steal from it."""
        if adapter:
            shard = adapter_shard(adapter, self.policy.shards)
            with self._lock:
                self._taken[shard] += 1
                if shard in self._steals:
                    left, until = self._steals[shard]
                    if left > 1:
                        self._steals[shard] = (left - 1, until)
                    else:
                        del self._steals[shard]

    def ran(self, adapters: Iterable[str | None], *, holding: int) -> None:
        """The adapters of the group just run (if any), and how many jobs the window holds now."""
        with self._lock:
            for adapter in adapters:
                if adapter:
                    shard = adapter_shard(adapter, self.policy.shards)
                    self._ran[shard] = None
                    self._ran.move_to_end(shard)
            while len(self._ran) > self.policy.held_adapters:
                self._ran.popitem(last=False)
            self._holding = holding

    @property
    def queues(self) -> tuple[str, ...]:
        """What this worker should consume now: `omni`, its shards' queues, then any it steals from."""
        now = time.monotonic()
        with self._lock:
            stolen = [shard_queue(s) for s, (_, until) in sorted(self._steals.items()) if until > now]
        return self._owned + tuple(q for q in stolen if q not in self._owned)

    def stop(self) -> None:
        """Leave the fleet at once (a clean stop): the next plan, made now, gives its shards away."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=TICK_S * 5)
        if not self.joins:
            return
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
        if not self.joins:
            self._adopt_orphans()
            return
        if CONSUMER.stuck(self.stuck_after_s):
            # A hung consumer takes nothing from its shards: without its heartbeat, they move.
            if not self._silent:
                logger.error("fleet: the consumer is stuck; leaving the plan until it works again")
            self._silent = True
            return
        self._silent = False
        with self._lock:
            held, holding, taken = list(self._ran), self._holding, dict(self._taken)
            self._taken.clear()
        ttl_ms = int(self.policy.heartbeat_ttl_s * 1000)
        beat = json.dumps({"held": held, "idle": holding == 0, "room": max(0, self.window - holding)})
        with self.redis.pipeline() as pipe:
            for shard, count in taken.items():
                pipe.hincrby(TAKEN_KEY, str(shard), count)
            self._scripts["beat"](
                keys=[WORKERS_KEY, HELD_KEY_PREFIX + self.worker],
                args=[self.worker, beat, ttl_ms],
                client=pipe,
            )
            self._scripts["lock"](keys=[LOCK_KEY], args=[self.worker, ttl_ms], client=pipe)
            if not self._joined:  # news: the next plan, made at once, gives a newcomer its share
                pipe.set(d.FLEET_NEWS_KEY, 1)
            replies = pipe.execute()
        coordinating = replies[len(taken) + 1]
        self._joined = True
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
        self._follow(FleetPlan.decode(raw))

    def _adopt_orphans(self) -> None:
        """Outside the fleet, consume the shard queues that hold jobs while no plan exists: no
        worker with affinity is left to, and their jobs would wait for one otherwise."""
        now = time.monotonic()
        if now - self._last_plan < self.policy.replan_s:
            return
        self._last_plan = now
        orphans = () if self.redis.exists(d.FLEET_PLAN_KEY) else sorted(self._read_backlog())
        self._owned = (d.QUEUE, *(shard_queue(shard) for shard in orphans))
        metrics.FLEET_SHARD_QUEUES.set(len(orphans))
        if orphans:
            logger.info("fleet: no worker follows the plan; taking from %d shard queue(s)", len(orphans))

    def _follow(self, plan: FleetPlan) -> None:
        """Take the plan's owned queues, and the steal it hands this worker (once per plan)."""
        self._owned = tuple(plan.assignment.queues_of(self.worker))
        metrics.FLEET_SHARD_QUEUES.set(len(self._owned) - 1)
        now = time.monotonic()
        with self._lock:
            self._steals = {s: steal for s, steal in self._steals.items() if steal[1] > now}
        if plan.version == self._plan_version:
            return
        self._plan_version = plan.version
        until = now + self.policy.replan_s
        for shard, count in plan.steals.get(self.worker, {}).items():
            if 0 <= shard < self.policy.shards and count > 0:
                with self._lock:
                    self._steals[shard] = (count, until)
                metrics.FLEET_STEALS.inc()
                logger.info("fleet: idle, so taking up to %d job(s) from %s", count, shard_queue(shard))

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
        previous = FleetPlan.decode(raw)
        held = {w: h.get("held", []) for w, h in heard.items()}
        assignment = plan(
            loads, Rendezvous(live), previous=previous.assignment, held=held, policy=self.policy
        )
        busy = Assignment({s: assignment.owners[s] for s in sorted(loads)})
        steals = self._steals_for(heard, busy, backlog)
        # Idleness alone plans again only while the last plan moved or stole something.
        self._settled = busy.owners == previous.assignment.owners and not steals
        encoded = FleetPlan(previous.version + 1, busy, steals).encode()
        ttl_ms = int(self.policy.replan_s * PLAN_LIFETIMES * 1000)
        self.redis.set(d.FLEET_PLAN_KEY, encoded, px=ttl_ms)
        logger.debug(
            "fleet: plan %d for %d worker(s), %d busy shard(s), %d steal(s)",
            previous.version + 1, len(live), len(loads), len(steals),
        )  # fmt: skip
        return encoded

    def _steals_for(
        self, heard: Mapping[str, dict[str, Any]], busy: Assignment, backlog: Mapping[int, int]
    ) -> dict[str, dict[int, int]]:
        """One steal for each idle worker, from the longest shard queue its owners cannot take soon."""
        thieves = sorted(w for w, h in heard.items() if h.get("idle") and h.get("room", 0) > 0)
        if not thieves or not backlog:
            return {}
        owners = {s: busy.owners.get(s, ()) for s in backlog}
        room = {s: sum(heard.get(w, {}).get("room", 0) for w in ws) for s, ws in owners.items()}
        # Age decides only where the owners have room for the whole backlog.
        ages = oldest_waits(self.redis, {s: shard_queue(s) for s, n in backlog.items() if n <= room[s]})
        shard_of = {shard_queue(s): s for s in backlog}
        states = {
            shard_queue(s): QueueState(
                name=shard_queue(s),
                backlog=n,
                head_age_s=ages.get(s, 0.0),
                owners=len(owners[s]),
                owners_room=room[s],
            )
            for s, n in backlog.items()
        }
        steals = {}
        for thief in thieves:
            target = steal_target(states.values(), own=set(busy.queues_of(thief)), policy=self.policy)
            if target is None:
                continue
            count = steal_count(target, heard[thief]["room"])
            steals[thief] = {shard_of[target.name]: count}
            states[target.name] = replace(target, backlog=target.backlog - count, owners=target.owners + 1)
        return steals

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
    A worker with affinity off only takes jobs stranded on shard queues when no plan is left.

    Its name in the fleet carries the process id: workers of one host (one per GPU) often share a
    Celery node name, and two members of one name would both coordinate and take each other out.
    """
    member = FleetMember(
        redis.Redis.from_url(settings.broker_url, socket_timeout=10),
        f"{worker}#{os.getpid()}",
        policy=AffinityPolicy(held_adapters=settings.max_cpu_loras),
        window=settings.window,
        joins=settings.follows_fleet,
        stuck_after_s=settings.stuck_after_s,
    )
    member.start()
    if member.joins:
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
