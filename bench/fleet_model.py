"""The discrete-event model behind bench/fleet.py: workers, the queues they take from, and for
affinity the coordinator's plans and stealing.

A worker takes jobs only between groups (its event loop is busy while a group runs), as many as
its window has room for, from the queues it consumes in the order its policy says. It runs the
group `choose` picks from its window (the real `worker.scheduler`), loading the group's adapter
if its cache (bench/scheduler.py's model) lacks it. A stopped worker's jobs (its window and its
running group) go back to the head of their queues after the visibility timeout. One heap of
events and insertion-ordered dicts: a run depends on nothing but its inputs.
"""

import heapq
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler import CALL_S, IMAGE_S, AdapterCache, Arrival, Chooser

from omni_engine.defaults import DEFAULT_MAX_CPU_LORAS, DEFAULT_MAX_LORAS
from producer import defaults as d
from producer.routing import adapter_shard, shard_queue
from worker.affinity import (
    AffinityPolicy,
    ArrivalRates,
    Assignment,
    Rendezvous,
    ShardLoad,
    plan,
    shard_demand,
)
from worker.scheduler import Pending
from worker.settings import DEFAULT_VISIBILITY_TIMEOUT_S
from worker.stealing import QueueState, steal_count, steal_target, take_order

CACHE = (DEFAULT_MAX_LORAS, DEFAULT_MAX_CPU_LORAS)  # resident / held adapters per worker

_DONE, _TICK, _CHECK, _STOP, _RESTORE = range(5)


@dataclass(eq=False)
class Worker:
    """One simulated worker process."""

    name: str
    cache: AdapterCache = field(default_factory=lambda: AdapterCache(*CACHE))
    window: list[Pending] = field(default_factory=list)
    # The queues it consumes, each with when it last took from it (0: never), for `take_order`.
    consumes: dict[str, int] = field(default_factory=lambda: {d.QUEUE: 0})
    running: list[Pending] = field(default_factory=list)
    alive: bool = True
    stopped_at: float = 0.0
    served: int = 0


class Sharing:
    """How jobs reach workers; the default is one queue that every worker consumes."""

    def __init__(self) -> None:
        self.stolen = self.moves = 0

    def route(self, job: Arrival) -> str:
        return d.QUEUE

    def start(self, sim: "Simulation") -> None:
        """Before the first worker looks for jobs."""

    def published(self, job: Arrival, queue: str) -> None:
        """A new job is on `queue`."""

    def taken(self, queue: str, count: int) -> None:
        """A worker took `count` jobs from `queue`."""

    def arrived(self, sim: "Simulation", queue: str) -> None:
        """`queue` has a job (new or returned): wake a worker that may take it."""
        sim.wake(next(iter(sim.idle), None))

    def order(self, sim: "Simulation", worker: Worker, queues: list[str]) -> list[str]:
        """The order `worker` takes from its `queues` that have jobs."""
        return queues

    def when_idle(self, sim: "Simulation", worker: Worker) -> None:
        """`worker`'s own queues are empty; it may find work elsewhere."""

    def tick(self, sim: "Simulation") -> None:
        """A `_TICK` event."""

    def check(self, sim: "Simulation", queue: str) -> None:
        """A `_CHECK` event."""


class Affinity(Sharing):
    """`worker.affinity` as a fleet would run it: the coordinator's plans, owners, stealing."""

    def __init__(self, policy: AffinityPolicy) -> None:
        super().__init__()
        self.policy = policy
        self.queue_of: dict[str, str] = {}
        self.shard_of = {shard_queue(shard): shard for shard in range(policy.shards)}
        self.rates = ArrivalRates(policy.rate_half_life_s)
        self.taken_since: Counter[int] = Counter()
        # Adapters named by each shard's jobs in this generation and the last (HyperLogLogs in Redis).
        self.seen: list[dict[int, set[str]]] = [{}, {}]
        self.generation_ends = policy.rate_half_life_s
        self.assignment = Assignment()
        self.ranking: Rendezvous | None = None
        self.owners: dict[str, tuple[str, ...]] = {}
        self.checks: set[str] = set()  # queues with a `_CHECK` event pending
        self.stealable: dict[str, None] = {}  # queues that were stealable when last looked at
        self.planned_at = 0.0

    def route(self, job: Arrival) -> str:
        queue = self.queue_of.get(job.adapter)
        if queue is None:
            queue = self.queue_of[job.adapter] = shard_queue(adapter_shard(job.adapter, self.policy.shards))
        return queue

    def published(self, job: Arrival, queue: str) -> None:
        self.seen[0].setdefault(self.shard_of[queue], set()).add(job.adapter)

    def taken(self, queue: str, count: int) -> None:
        if queue in self.shard_of:
            self.taken_since[self.shard_of[queue]] += count

    def start(self, sim: "Simulation") -> None:
        self.tick(sim)

    def tick(self, sim: "Simulation") -> None:
        """The coordinator: what was taken, what is queued and what is held in; a plan out."""
        # 1. Read: rates, backlogs, adapters per shard, live workers and what each holds.
        self.rates.advance(sim.now - self.planned_at, self.taken_since)
        self.taken_since.clear()
        self.planned_at = sim.now
        if sim.now >= self.generation_ends:
            self.seen = [{}, self.seen[0]]
            self.generation_ends += self.policy.rate_half_life_s
        backlog = {self.shard_of[q]: len(sim.queues[q]) for q in sim.nonempty if q in self.shard_of}
        shards = {}
        for shard in self.rates.jobs.keys() | backlog.keys():
            adapters = self.seen[0].get(shard, set()) | self.seen[1].get(shard, set())
            demand = shard_demand(self.rates.per_second(shard), backlog.get(shard, 0), policy=self.policy)
            shards[shard] = ShardLoad(demand, max(1, len(adapters)))
        live = sorted(
            w.name for w in sim.workers if w.alive or sim.now - w.stopped_at < self.policy.heartbeat_ttl_s
        )
        if self.ranking is None or list(self.ranking.workers) != live:
            self.ranking = Rendezvous(live)
        held = {
            w.name: {self.shard_of[self.queue_of[adapter]] for adapter in w.cache.held}
            for w in sim.workers
            if w.alive
        }
        # 2. Plan, and every worker consumes its queues at once.
        new = plan(shards, self.ranking, previous=self.assignment, held=held, policy=self.policy)
        if self.assignment.owners:  # each owner a busy shard gains may have to load its adapters
            self.moves += sum(len(set(new.owners[s]) - set(self.assignment.owners[s])) for s in shards)
        before, self.assignment = self.owners, new
        self.owners = {shard_queue(shard): owners for shard, owners in new.owners.items()}
        for worker in sim.workers:
            if worker.alive:
                worker.consumes = {
                    queue: worker.consumes.get(queue, 0) for queue in new.queues_of(worker.name)
                }
        for name in list(sim.idle):
            if name in sim.idle and any(queue in sim.nonempty for queue in sim.by_name[name].consumes):
                sim.wake(name)
        for queue in [q for q in sim.nonempty if before.get(q) != self.owners.get(q)]:
            self.look(sim, queue)  # new owners: it may be stolen, or no longer
        self.offer(sim)
        sim.push(sim.now + self.policy.replan_s, _TICK, None)

    def arrived(self, sim: "Simulation", queue: str) -> None:
        """An idle owner takes it; else an idle worker steals it once it may."""
        owners = self.owners.get(queue)
        if owners is None:  # the plain queue: any idle worker
            sim.wake(next(iter(sim.idle), None))
            return
        idle = [name for name in owners if name in sim.idle]
        if idle:  # the one idle longest: idle workers all poll, none is first every time
            sim.wake(min(idle, key=sim.idle.__getitem__))
            return
        self.check(sim, queue)

    def check(self, sim: "Simulation", queue: str) -> None:
        self.look(sim, queue)
        self.offer(sim)

    def look(self, sim: "Simulation", queue: str) -> None:
        """Note `queue` for thieves if it may be stolen now; else look again when its oldest job may."""
        self.checks.discard(queue)
        if queue not in sim.nonempty:
            return
        if steal_target([self.state(sim, queue)], own=(), policy=self.policy) is not None:
            self.stealable[queue] = None
        due = sim.queues[queue][0].enqueued + self.policy.steal_after_s
        if due > sim.now and queue not in self.checks:
            self.checks.add(queue)
            sim.push(due, _CHECK, queue)

    def offer(self, sim: "Simulation") -> None:
        """Idle workers, longest idle first, each steal while there is something they may steal."""
        while sim.idle:
            name = next(iter(sim.idle))
            if self.target(sim, sim.by_name[name]) is None:
                return
            sim.wake(name)
            if name in sim.idle:  # it found nothing after all
                return

    def order(self, sim: "Simulation", worker: Worker, queues: list[str]) -> list[str]:
        waited = {queue: sim.now - sim.queues[queue][0].enqueued for queue in queues}
        return take_order(queues, last_taken=worker.consumes, waited=waited, policy=self.policy)

    def when_idle(self, sim: "Simulation", worker: Worker) -> None:
        target = self.target(sim, worker)
        if target is not None:
            count = steal_count(target, sim.window - len(worker.window))
            self.stolen += sim.take(worker, target.name, count)

    def target(self, sim: "Simulation", worker: Worker) -> QueueState | None:
        """`steal_target` over the queues noted for thieves (checking every queue at every idle
        moment would cost a large fleet's simulation hours; a real worker reads them in one round trip)."""
        for queue in [queue for queue in self.stealable if queue not in sim.nonempty]:
            del self.stealable[queue]
        states = [self.state(sim, queue) for queue in self.stealable if queue not in worker.consumes]
        return steal_target(states, own=worker.consumes, policy=self.policy)

    def state(self, sim: "Simulation", queue: str) -> QueueState:
        # A stopped owner still counts until its heartbeat expires, with the room it last reported.
        # The room is summed only until it covers the backlog: all `steal_target` asks of it (and
        # a shard may have hundreds of owners).
        owners = self.owners.get(queue, ())
        jobs = sim.queues[queue]
        room = 0
        for name in owners:
            if room > len(jobs):
                break
            room += sim.window - len(sim.by_name[name].window)
        return QueueState(
            name=queue,
            backlog=len(jobs),
            head_age_s=sim.now - jobs[0].enqueued,
            owners=len(owners),
            owners_room=room,
        )


class Simulation:
    """The event loop: arrivals, groups ending, the coordinator's ticks, steal checks, stops, returns."""

    def __init__(
        self, arrivals: Sequence[Arrival], sharing: Sharing, *, workers: int, window: int, choose: Chooser
    ) -> None:
        self.arrivals = arrivals
        self.sharing = sharing
        self.window = window
        self.choose = choose
        self.workers = [Worker(f"w{i:04d}") for i in range(workers)]
        self.by_name = {worker.name: worker for worker in self.workers}
        self.queues: dict[str, deque[Arrival]] = {}
        self.nonempty: dict[str, None] = {}  # insertion-ordered, so no run depends on string hashing
        self.idle: dict[str, float] = {}  # since when; the longest idle first
        self.events: list[tuple[float, int, int, object]] = []
        self.seq = self.stamp = 0
        self.now = 0.0
        self.waits: dict[str, float] = {}
        self.done: set[str] = set()
        self.runs = 0

    def push(self, at: float, kind: int, payload: object) -> None:
        if at < self.now:
            raise RuntimeError(f"an event at {at} before now ({self.now})")
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, payload))

    def stop_at_half(self, count: int) -> None:
        """Stop `count` workers, evenly spread, when half the jobs have arrived."""
        step = len(self.workers) // count
        self.push(self.arrivals[len(self.arrivals) // 2].enqueued, _STOP, self.workers[: step * count : step])

    def run(self) -> None:
        """Until every job has run to the end; RuntimeError if any is stranded."""
        pending = deque(self.arrivals)
        while pending and pending[0].enqueued <= 0:  # a dataset queued at once is there at the start
            self.enqueue(pending.popleft())
        self.sharing.start(self)
        for worker in self.workers:
            self.step(worker)
        while len(self.done) < len(self.arrivals):
            if pending and (not self.events or pending[0].enqueued <= self.events[0][0]):
                job = pending.popleft()
                self.now = job.enqueued
                self.sharing.arrived(self, self.enqueue(job))
                continue
            if not self.events:
                raise RuntimeError(f"{len(self.arrivals) - len(self.done)} job(s) stranded")
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == _DONE:
                self.finish(payload)
            elif kind == _TICK:
                self.sharing.tick(self)
            elif kind == _CHECK:
                self.sharing.check(self, payload)
            elif kind == _STOP:
                for worker in payload:
                    self.stop(worker)
            else:
                for job in reversed(payload):
                    self.enqueue(job, head=True)
                for queue in dict.fromkeys(self.sharing.route(job) for job in payload):
                    self.sharing.arrived(self, queue)

    def enqueue(self, job: Arrival, *, head: bool = False) -> str:
        """A new job at the tail of its queue, or one returned at the head, as kombu restores it."""
        queue = self.sharing.route(job)
        jobs = self.queues.setdefault(queue, deque())
        if head:
            jobs.appendleft(job)
        else:
            jobs.append(job)
            self.sharing.published(job, queue)
        self.nonempty[queue] = None
        return queue

    def take(self, worker: Worker, queue: str, count: int) -> int:
        """Move up to `count` jobs from the head of `queue` into the worker's window."""
        jobs = self.queues[queue]
        taken = min(count, len(jobs))
        for _ in range(taken):
            job = jobs.popleft()
            worker.window.append(
                Pending(
                    job_id=job.job_id,
                    adapter=job.adapter,
                    batch_key=job.batch_key,
                    arrived=self.now,
                    payload=job,
                )
            )
        if not jobs:
            del self.nonempty[queue]
        self.sharing.taken(queue, taken)
        return taken

    def refill(self, worker: Worker) -> None:
        """One take: the consumed queues with jobs in `take_order`, until the window is full."""
        if len(self.nonempty) < len(worker.consumes):
            ready = [queue for queue in self.nonempty if queue in worker.consumes]
        else:
            ready = [queue for queue in worker.consumes if queue in self.nonempty]
        for queue in self.sharing.order(self, worker, ready):
            room = self.window - len(worker.window)
            if room <= 0:
                return
            self.take(worker, queue, room)
            self.stamp += 1
            worker.consumes[queue] = self.stamp

    def wake(self, name: str | None) -> None:
        if name is not None:
            del self.idle[name]
            self.step(self.by_name[name])

    def step(self, worker: Worker) -> None:
        """Between groups: take what the window has room for, then run the next group, or idle."""
        self.refill(worker)
        if not worker.window:
            self.sharing.when_idle(self, worker)
        if not worker.window:
            self.idle[worker.name] = self.now
            return
        group = self.choose(worker.window, worker.cache, self.now)
        chosen = {job.job_id for job in group}
        worker.window = [job for job in worker.window if job.job_id not in chosen]
        start = self.now + worker.cache.activate(group[0].adapter)
        for job in group:
            self.waits[job.job_id] = start - job.payload.enqueued
        worker.running = group
        self.runs += len(group)
        self.push(start + CALL_S + IMAGE_S * len(group), _DONE, worker)

    def finish(self, worker: Worker) -> None:
        if not worker.alive:
            return  # stopped mid-group: its jobs were returned, not finished
        self.done.update(job.job_id for job in worker.running)
        worker.served += len(worker.running)
        worker.running = []
        self.step(worker)

    def stop(self, worker: Worker) -> None:
        """Killed: what it held comes back after the visibility timeout (unacked, its leases not renewed)."""
        held = [job.payload for job in worker.running + worker.window]
        worker.alive, worker.stopped_at = False, self.now
        worker.running, worker.window, worker.consumes = [], [], {}
        self.idle.pop(worker.name, None)
        if held:
            self.push(self.now + DEFAULT_VISIBILITY_TIMEOUT_S, _RESTORE, held)
