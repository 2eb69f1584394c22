"""Adapter affinity across a fleet: which workers own which shards, so a fleet loads each adapter
about once, where workers that all take from one queue each meet, and load, every popular one.

An adapter's jobs travel on its shard queue (`producer.routing`). A coordinator plans, every
`replan_s`, which live workers own each shard, from what each shard asks (`shard_demand`: the
rate its jobs are taken at, plus its backlog to drain) and what each worker holds:

1. **Rendezvous.** A shard's candidates are the live workers ranked by a hash of (worker, shard)
   (highest random weight): a worker that joins or leaves reorders no other pair, and a shard
   that needs a new owner finds the same few candidates whoever plans.
2. **Replicas.** A hot shard is split into equal units, each at most `replica_share` of a
   worker's mean demand, each with its own owner. Its owners all take from its one queue as they
   have time, so the queue evens out their load.
3. **A band.** Each worker's planned demand stays within `slack` of the fleet's mean and the
   adapters of its shards within its cache (`held_adapters`). Inside those limits nothing moves,
   since a move costs the new owner a load; a worker past the band gives units away until it is
   back at the mean, one below it takes units from workers above the mean.
4. **Placement.** A unit with no owner (new, shed, or its owner gone) goes to a worker that
   already holds its adapters if one has room, else to the less loaded of the shard's first
   `choices` candidates, else the first with room.

Workers also take from the plain queue (`omni`: jobs from clients that do not route, and jobs
with no adapter), and steal when idle (`worker.stealing`). The module is pure (no Celery, no
Redis, no clock): docs/scheduling.md says what a real coordinator reads and how workers follow.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from hashlib import blake2b
from itertools import islice
from math import ceil, isfinite

from omni_engine.defaults import DEFAULT_MAX_CPU_LORAS
from producer import defaults as d
from producer.routing import shard_queue
from worker.errors import SchedulingError

# Each worker's planned demand stays within this fraction of the fleet's mean: a worker above the
# band gives units away, one below it takes some; inside it, nothing moves.
DEFAULT_SLACK = 0.2
# A shard gets as many owners as keep each one's part of its demand within this share of a worker's
# mean. Below 1, a hot shard's owners keep room for other work; its queue, which they all take from
# as they have time, then evens out their load, and the plan need not move cold shards to do it.
DEFAULT_REPLICA_SHARE = 0.5
# A unit without an owner goes to the less loaded of the first this many workers of its shard's order
# ("power of two choices": much better balance than the first alone, still a short list per shard).
DEFAULT_CHOICES = 2
# A hot shard gives up a replica only once its demand has fallen to this fraction of what one
# replica fewer would carry at the mean: a shard near a boundary does not gain and lose an owner
# (who loads its adapters each time) at every plan.
DEFAULT_SHRINK = 0.75
# A backlog counts as demand spread over this long: a dataset queued at once is shared out by size.
DEFAULT_DRAIN_S = 300.0
# A job queued this long is fair game for any idle worker, whoever owns its shard. Above the
# longest group (a cold load and a full batch), so an owner that is merely busy takes it first.
DEFAULT_STEAL_AFTER_S = 30.0
# How often the coordinator plans again, and how fast its arrival rates forget.
DEFAULT_REPLAN_S = 15.0
DEFAULT_RATE_HALF_LIFE_S = 600.0
# A worker whose heartbeat is older than this is left out of the next plan.
DEFAULT_HEARTBEAT_TTL_S = 30.0

_MASK64 = (1 << 64) - 1
# A shard's decayed job count below which its rate is taken as nothing.
_FORGOTTEN = 1e-3


@dataclass(frozen=True, kw_only=True, slots=True)
class AffinityPolicy:
    """How the fleet shares out shards. The coordinator and every worker use the same values."""

    shards: int = d.SHARDS
    replica_share: float = DEFAULT_REPLICA_SHARE
    slack: float = DEFAULT_SLACK
    choices: int = DEFAULT_CHOICES
    held_adapters: int = DEFAULT_MAX_CPU_LORAS
    shrink: float = DEFAULT_SHRINK
    drain_s: float = DEFAULT_DRAIN_S
    steal_after_s: float = DEFAULT_STEAL_AFTER_S
    replan_s: float = DEFAULT_REPLAN_S
    rate_half_life_s: float = DEFAULT_RATE_HALF_LIFE_S
    heartbeat_ttl_s: float = DEFAULT_HEARTBEAT_TTL_S

    def __post_init__(self) -> None:
        problems = []
        if self.shards < 1:
            problems.append(f"shards must be >= 1, got {self.shards!r}")
        if not 0 <= self.slack < 1:
            problems.append(f"slack must be in [0, 1), got {self.slack!r}")
        if self.held_adapters < 1:
            problems.append(f"held_adapters must be >= 1, got {self.held_adapters!r}")
        if self.choices < 1:
            problems.append(f"choices must be >= 1, got {self.choices!r}")
        if not 0 < self.replica_share <= 1:
            problems.append(f"replica_share must be in (0, 1], got {self.replica_share!r}")
        if not 0 < self.shrink <= 1:
            problems.append(f"shrink must be in (0, 1], got {self.shrink!r}")
        for name in ("drain_s", "steal_after_s", "replan_s", "rate_half_life_s", "heartbeat_ttl_s"):
            value = getattr(self, name)
            if not (isfinite(value) and value > 0):
                problems.append(f"{name} must be a number of seconds > 0, got {value!r}")
        if problems:
            raise SchedulingError("AffinityPolicy: " + "; ".join(problems))


class ArrivalRates:
    """Jobs per second per shard over an exponentially weighted window (half-life `half_life_s`).

    The jobs and the seconds decay alike, so a young meter gives the plain average so far (not a
    rate pulled towards zero), and a burst or a lull shows within a half-life. What the
    coordinator keeps between plans; shards with (almost) nothing counted are dropped.
    """

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self.seconds = 0.0
        self.jobs: dict[int, float] = {}

    def advance(self, elapsed_s: float, counts: Mapping[int, int]) -> None:
        """`counts[shard]` jobs were taken from each shard's queue in the last `elapsed_s` seconds."""
        keep = 0.5 ** (elapsed_s / self.half_life_s)
        self.seconds = self.seconds * keep + elapsed_s
        for shard in list(self.jobs):
            self.jobs[shard] *= keep
            if self.jobs[shard] < _FORGOTTEN:
                del self.jobs[shard]
        for shard, count in counts.items():
            if count:
                self.jobs[shard] = self.jobs.get(shard, 0.0) + count

    def per_second(self, shard: int) -> float:
        return self.jobs.get(shard, 0.0) / self.seconds if self.seconds > 0 else 0.0


def shard_demand(rate: float, backlog: int, *, policy: AffinityPolicy) -> float:
    """What a shard asks of the fleet, in jobs per second: what arrives, plus its backlog drained."""
    return rate + backlog / policy.drain_s


def replicas(demand: float, mean: float, *, previous: int, workers: int, policy: AffinityPolicy) -> int:
    """How many owners a shard needs: enough that none carries more than `replica_share` of the
    fleet's `mean` demand per worker, and at most every worker.

    `previous` is its count in the last plan; a count shrinks only once the demand has fallen to
    `policy.shrink` of what one owner fewer would carry.
    """
    if demand <= 0 or mean <= 0:
        return 1
    need = demand / mean / policy.replica_share
    count = max(1, ceil(need - 1e-9))
    if count < previous and need > (previous - 1) * policy.shrink:
        count = previous
    return min(count, workers)


class Rendezvous:
    """The live workers and, per shard, their order by highest random weight (each order computed once)."""

    def __init__(self, workers: Iterable[str]) -> None:
        self.workers = tuple(sorted(set(workers)))
        if not self.workers:
            raise SchedulingError("Rendezvous: a plan needs at least one live worker")
        self._keys = {worker: _digest64(worker.encode()) for worker in self.workers}
        self._orders: dict[int, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self.workers)

    def rank_key(self, worker: str, shard: int) -> tuple[int, str]:
        """Sorts workers in the shard's order: highest weight first, ties by name."""
        return (-_fmix64(self._keys[worker] ^ _salt(shard)), worker)

    def order(self, shard: int) -> tuple[str, ...]:
        """Every live worker, the shard's first choice first."""
        found = self._orders.get(shard)
        if found is None:
            found = self._orders[shard] = tuple(sorted(self.workers, key=lambda w: self.rank_key(w, shard)))
        return found


@dataclass(frozen=True)
class Assignment:
    """Each shard's owners, in the order they were placed; every shard has at least one."""

    owners: Mapping[int, tuple[str, ...]] = field(default_factory=dict)

    @cached_property
    def _by_worker(self) -> dict[str, list[int]]:
        by_worker: dict[str, list[int]] = {}
        for shard, owners in sorted(self.owners.items()):
            for worker in owners:
                by_worker.setdefault(worker, []).append(shard)
        return by_worker

    def queues_of(self, worker: str) -> list[str]:
        """What `worker` consumes: the plain queue, then its shards' queues."""
        return [d.QUEUE, *(shard_queue(shard) for shard in self._by_worker.get(worker, ()))]


@dataclass(frozen=True, slots=True)
class ShardLoad:
    """What a shard asks of the fleet: jobs per second (`shard_demand`), and how many adapters
    those jobs name (each owner may have to hold all of them)."""

    demand: float
    adapters: int = 1


def plan(
    shards: Mapping[int, ShardLoad],
    ranking: Rendezvous,
    *,
    previous: Assignment | None = None,
    held: Mapping[str, Collection[int]] | None = None,
    policy: AffinityPolicy,
) -> Assignment:
    """Owners for every shard of `policy.shards` (a shard missing from `shards` asks for nothing).

    Two limits per worker: its demand stays within `slack` of the fleet's mean, and the adapters
    of its shards fit in `held_adapters` (else its cache would load them again and again). It moves
    as little as it can: a shard keeps its live owners while they are within both limits.
    Deterministic: equal inputs give equal plans.
    """
    previous = previous or Assignment()
    live = len(ranking)
    unknown = sorted(shard for shard in shards if not 0 <= shard < policy.shards)
    if unknown:
        raise SchedulingError(f"plan: shards {unknown[:5]} are not in 0..{policy.shards - 1}")

    # 1. Units: each shard's demand in equal parts, as many as keep each within the mean.
    mean = sum(max(0.0, load.demand) for load in shards.values()) / live
    counts = dict.fromkeys(range(policy.shards), 1)
    size = dict.fromkeys(range(policy.shards), 0.0)
    width = dict.fromkeys(range(policy.shards), 0)
    for shard, load in shards.items():
        if load.demand > 0:
            before = len(previous.owners.get(shard, ()))
            counts[shard] = replicas(load.demand, mean, previous=before, workers=live, policy=policy)
            size[shard] = load.demand / counts[shard]
            width[shard] = load.adapters
    slots = sum(width[shard] * counts[shard] for shard in shards)
    book = _Book(ranking, mean, size, width, policy, slots=slots, held=held or {})

    # 2. Keep: each shard stays with its live previous owners, best ranked first, up to its count.
    missing = []
    for shard, count in counts.items():
        kept = [w for w in previous.owners.get(shard, ()) if w in book.load]
        if len(kept) > 1:
            kept = sorted(kept, key=lambda w: ranking.rank_key(w, shard))[:count]
        for worker in kept:
            book.add(shard, worker)
        missing += [shard] * (count - len(kept))

    # 3. Shed: a worker past a limit gives up as few units as bring it back; each costs a load.
    for worker in sorted(book.load, key=lambda w: (-book.load[w], w)):
        for shard in book.surplus(worker):
            book.remove(shard, worker)
            missing.append(shard)

    # 4. Place: units with no owner, heaviest first, on the less loaded of the shard's first
    #    `choices` candidates (ties to the better ranked), else the first with room, else the least loaded.
    for shard in sorted(missing, key=lambda s: (-size[s], s)):
        book.add(shard, book.place(shard))

    # 5. Fill: a worker below the band takes units, heaviest first, from workers above the mean.
    for worker in sorted(book.load, key=lambda w: (book.load[w], w)):
        while book.load[worker] < book.low and (move := book.donation(worker)) is not None:
            shard, donor = move
            book.remove(shard, donor)
            book.add(shard, worker)
    return Assignment({shard: tuple(owners) for shard, owners in sorted(book.owners.items())})


def lower_bound(adapters: Sequence[str], workers: int) -> int:
    """The fewest cold loads a fleet of `workers` can serve jobs naming `adapters` (one entry per
    job) with, when no worker does more than the mean share of the jobs: each adapter once, or on
    as many workers as its jobs need (docs/scheduling.md)."""
    counts = Counter(adapters)
    return sum(max(1, -(-count * workers // len(adapters))) for count in counts.values())


class _Book:
    """A plan being made: each worker's units, demand and adapters; each shard's owners."""

    def __init__(
        self,
        ranking: Rendezvous,
        mean: float,
        size: dict[int, float],
        width: dict[int, int],
        policy: AffinityPolicy,
        *,
        slots: int,
        held: Mapping[str, Collection[int]],
    ) -> None:
        self.ranking = ranking
        self.choices = policy.choices
        self.mean = mean
        self.size = size
        self.width = width
        tolerance = 1e-9 * mean  # rounding must not make an exact fit miss
        self.high = mean * (1 + policy.slack) + tolerance
        self.low = mean * (1 - policy.slack) - tolerance
        self.fits = mean + tolerance
        # When the fleet's adapters cannot fit in its caches, each worker holds its share of them.
        self.capacity = max(policy.held_adapters, ceil(slots / len(ranking) * (1 + policy.slack)))
        self.load = dict.fromkeys(ranking.workers, 0.0)
        self.used = dict.fromkeys(ranking.workers, 0)
        self.shards: dict[str, list[int]] = {worker: [] for worker in ranking.workers}
        self.owners: dict[int, list[str]] = {}
        self.held = {worker: set(held.get(worker, ())) for worker in ranking.workers}
        self.holders: dict[int, list[str]] = {}
        for worker in ranking.workers:
            for shard in sorted(self.held[worker]):
                self.holders.setdefault(shard, []).append(worker)

    def add(self, shard: int, worker: str) -> None:
        self.owners.setdefault(shard, []).append(worker)
        self.shards[worker].append(shard)
        self.load[worker] += self.size[shard]
        self.used[worker] += self.width[shard]

    def remove(self, shard: int, worker: str) -> None:
        self.owners[shard].remove(worker)
        self.shards[worker].remove(shard)
        self.load[worker] -= self.size[shard]
        self.used[worker] -= self.width[shard]

    def room(self, worker: str, shard: int, *, limit: float | None = None) -> bool:
        return (
            self.load[worker] + self.size[shard] <= (self.high if limit is None else limit)
            and self.used[worker] + self.width[shard] <= self.capacity
        )

    def surplus(self, worker: str) -> list[int]:
        """The units `worker` gives up: none inside its limits; past the band, enough to bring it back
        to the mean (not just inside the band, where noise would push it out again at once)."""
        mine = sorted((s for s in self.shards[worker] if self.size[s] > 0), key=lambda s: (self.size[s], s))
        shed: list[int] = []
        if self.load[worker] > self.high:
            excess = self.load[worker] - self.fits
            while excess > 0 and mine:  # the smallest unit that is enough, else the largest
                shard = next((s for s in mine if self.size[s] >= excess), mine[-1])
                mine.remove(shard)
                shed.append(shard)
                excess -= self.size[shard]
        used = self.used[worker] - sum(self.width[s] for s in shed)
        while used > self.capacity and len(mine) > 1:  # a lone shard too wide stays
            shard = mine.pop(0)
            shed.append(shard)
            used -= self.width[shard]
        return shed

    def place(self, shard: int) -> str:
        owners = self.owners.get(shard, ())
        holding = [w for w in self.holders.get(shard, ()) if w not in owners and self.room(w, shard)]
        if holding:  # it has the adapters already: the move costs no load
            return min(holding, key=lambda w: (self.load[w], w))
        candidates = (w for w in self.ranking.order(shard) if w not in owners)
        first = list(islice(candidates, self.choices))
        chosen = min(first, key=self.load.__getitem__)  # the first of equals: the better ranked
        if self.room(chosen, shard):
            return chosen
        rest = [*first, *candidates]
        return next(
            (w for w in rest if self.room(w, shard)),
            min(rest, key=lambda w: (self.used[w] + self.width[shard] > self.capacity, self.load[w])),
        )

    def donation(self, worker: str) -> tuple[int, str] | None:
        """The heaviest unit `worker` can take without passing the mean, from a worker above it."""
        offers = [
            (shard, donor)
            for donor, load in self.load.items()
            if load > self.mean
            for shard in self.shards[donor]
            if self.size[shard] > 0
            and load - self.size[shard] >= self.low
            and worker not in self.owners[shard]
            and self.room(worker, shard, limit=self.fits)
        ]
        held = self.held[worker]
        return min(offers, key=lambda o: (o[0] not in held, -self.size[o[0]], o[0], o[1]), default=None)


def _digest64(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def _salt(shard: int) -> int:
    return _fmix64((shard + 1) * 0x9E3779B97F4A7C15 & _MASK64)


def _fmix64(x: int) -> int:
    """MurmurHash3's 64-bit finaliser: a cheap mix, so a shard's order costs one pass over the workers."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _MASK64
    return x ^ (x >> 33)
