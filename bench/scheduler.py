"""How many adapter loads grouping saves against FIFO and against the minimum, and what it does to waits.

    python bench/scheduler.py [--quick] [--max-wait SECONDS]

Simulated, not measured: jobs arrive over time (seeded exponential gaps), the worker takes them into a
window of W jobs as room frees, `worker.scheduler` picks each group from the window, and an LRU model of
the engine's adapter cache (R adapters resident in the model, H held in host memory, resident ones
included, as the engine counts them; a host hit is promoted to resident) says what each group costs.
Costs are fixed simulated seconds of roughly SDXL size (about 4.2 s to load a LoRA against about 7 s
end to end: docs/architecture.md), so waits mean something: a job's wait runs from its enqueueing to
the start of its pipeline call, any load included. The minimum number of cold loads for a workload is
the number of distinct adapters in it. FIFO runs one job at a time in arrival order, so its figures do
not depend on the window. Prints a Markdown table.

A second table is a whole dataset queued at once (every job enqueued at time 0), as `omni-batch submit`
sends a file: in the file's order, and in the order `Client.submit_many` publishes it
(`producer.client.grouped_order`: each adapter's jobs of one batch key together).
"""

import argparse
import random
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate

from producer.client import grouped_order
from producer.schema import Job
from worker.scheduler import DEFAULT_MAX_WAIT_S, Pending, SchedulerPolicy, next_fifo, next_group

# Simulated costs, in seconds.
COLD_LOAD_S = 4.0  # read from disk, validate, load into the model
HOST_LOAD_S = 0.5  # copy a host-memory state dict into the model
CALL_S = 0.5  # fixed cost of one pipeline call
IMAGE_S = 2.5  # per image in a call
# Jobs arrive as fast as a worker that never loaded an adapter could run them one at a time.
MEAN_GAP_S = CALL_S + IMAGE_S

ZIPF_S = 1.1
SEED = 20250101
# (width, height, steps, guidance, scale) and how often each is asked for.
BATCH_KEYS = ((1024, 1024, 28, 5.0, 1.0), (832, 1216, 28, 5.0, 1.0))
BATCH_KEY_WEIGHTS = (0.8, 0.2)

FULL = {"jobs": 5000, "adapters": (10, 100, 1000), "windows": (1, 8, 64, 512), "caches": ((1, 16), (4, 16))}
QUICK = {"jobs": 1000, "adapters": (10, 100), "windows": (1, 64), "caches": ((1, 16),)}


@dataclass(frozen=True)
class Arrival:
    """A job as the broker sees it: when it was enqueued, and what it needs."""

    job_id: str
    adapter: str
    batch_key: tuple[int, int, int, float, float]
    enqueued: float


@dataclass(frozen=True)
class Result:
    """What one policy did with one workload."""

    cold_loads: int
    host_loads: int
    max_wait_s: float
    median_wait_s: float


class AdapterCache:
    """The engine's two LRU tiers without the engine: which adapters are resident, which in host memory."""

    def __init__(self, resident: int, host: int) -> None:
        if not 1 <= resident <= host:
            raise ValueError(
                f"AdapterCache: need 1 <= resident <= host, got resident={resident}, host={host}"
            )
        self.resident_capacity = resident
        self.host_capacity = host
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.held: OrderedDict[str, None] = OrderedDict()  # host memory, resident adapters included
        self.cold_loads = 0
        self.host_loads = 0

    def activate(self, adapter: str | None) -> float:
        """Make `adapter` resident, evicting the least recently used as the engine does; return the cost."""
        if adapter is None:
            return 0.0
        if adapter in self.resident:
            cost = 0.0
        elif adapter in self.held:
            self.host_loads += 1
            cost = HOST_LOAD_S
        else:
            self.cold_loads += 1
            cost = COLD_LOAD_S
            self.held[adapter] = None
            if len(self.held) > self.host_capacity:
                evicted, _ = self.held.popitem(last=False)
                self.resident.pop(evicted, None)
        self.held.move_to_end(adapter)
        self.resident[adapter] = None
        self.resident.move_to_end(adapter)
        if len(self.resident) > self.resident_capacity:
            self.resident.popitem(last=False)  # demoted: still held in host memory
        return cost


Chooser = Callable[[Sequence[Pending], AdapterCache, float], list[Pending]]


def grouped(
    window: Sequence[Pending], cache: AdapterCache, now: float, *, policy: SchedulerPolicy
) -> list[Pending]:
    """The worker's choice: `next_group` told what the cache holds."""
    return next_group(window, resident=cache.resident.keys(), host=cache.held.keys(), now=now, policy=policy)


def fifo(window: Sequence[Pending], cache: AdapterCache, now: float) -> list[Pending]:
    """The baseline: arrival order, one job at a time, whatever the cache holds."""
    return next_fifo(window)


def make_arrivals(
    popularity: str, adapters: int, jobs: int, *, mean_gap_s: float = MEAN_GAP_S
) -> list[Arrival]:
    """A seeded stream: adapters drawn uniformly or Zipf(1.1), exponential gaps between arrivals."""
    rng = random.Random(f"{SEED}-{popularity}-{adapters}")
    if popularity == "uniform":
        weights = [1.0] * adapters
    else:
        weights = [1.0 / rank**ZIPF_S for rank in range(1, adapters + 1)]
    picks = rng.choices(range(adapters), cum_weights=list(accumulate(weights)), k=jobs)
    keys = rng.choices(BATCH_KEYS, weights=BATCH_KEY_WEIGHTS, k=jobs)
    arrivals, now = [], 0.0
    for i, (pick, key) in enumerate(zip(picks, keys, strict=True)):
        now += rng.expovariate(1.0 / mean_gap_s)
        arrivals.append(Arrival(job_id=f"{i:06d}", adapter=f"lora-{pick:04d}", batch_key=key, enqueued=now))
    return arrivals


def queued_at_once(arrivals: Sequence[Arrival], *, grouped: bool) -> list[Arrival]:
    """The same jobs all enqueued at time 0, in their own order or in the order the client publishes."""
    if grouped:
        by_id = {job.job_id: job for job in arrivals}
        jobs = [
            Job(job_id=a.job_id, prompt="p", adapter=a.adapter, width=w, height=h, steps=s, guidance_scale=g)
            for a in arrivals
            for w, h, s, g, _ in [a.batch_key]
        ]
        arrivals = [by_id[job.job_id] for job in grouped_order(jobs)]
    return [Arrival(a.job_id, a.adapter, a.batch_key, 0.0) for a in arrivals]


def simulate(
    arrivals: Sequence[Arrival], choose: Chooser, *, window: int, resident: int, host: int
) -> Result:
    """Run the stream through a worker with a `window`-job buffer and an R/H adapter cache."""
    cache = AdapterCache(resident, host)
    enqueued = {job.job_id: job.enqueued for job in arrivals}
    buffer: list[Pending] = []
    waits: list[float] = []
    now = freed_at = 0.0
    taken = 0
    while taken < len(arrivals) or buffer:
        # 1. Refill the window: a job enters once it is enqueued and a slot is free.
        if not buffer and arrivals[taken].enqueued > now:
            now = arrivals[taken].enqueued
        while taken < len(arrivals) and len(buffer) < window and arrivals[taken].enqueued <= now:
            job = arrivals[taken]
            entered = max(job.enqueued, freed_at)
            buffer.append(
                Pending(job_id=job.job_id, adapter=job.adapter, batch_key=job.batch_key, arrived=entered)
            )
            taken += 1
        # 2. Pick a group and free its slots.
        group = choose(buffer, cache, now)
        chosen = {job.job_id for job in group}
        buffer = [job for job in buffer if job.job_id not in chosen]
        freed_at = now
        # 3. Load its adapter if needed, then run the group as one pipeline call.
        now += cache.activate(group[0].adapter)
        waits.extend(now - enqueued[job.job_id] for job in group)
        now += CALL_S + IMAGE_S * len(group)
    return Result(cache.cold_loads, cache.host_loads, max(waits), statistics.median(waits))


HEADER = (
    "| popularity | adapters | cache R/H | window | jobs | min loads (distinct) | FIFO cold / host loads "
    "| grouped cold / host loads | grouped cold / min | grouped cold / FIFO | grouped all loads / FIFO "
    "| FIFO wait max / median (s) | grouped wait max / median (s) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def bench_workload(
    popularity: str,
    adapters: int,
    *,
    jobs: int,
    windows: Sequence[int],
    cache: tuple[int, int],
    policy: SchedulerPolicy,
) -> list[str]:
    """One workload and cache size: FIFO once, the grouped scheduler at each window; Markdown rows."""
    arrivals = make_arrivals(popularity, adapters, jobs)
    distinct = len({job.adapter for job in arrivals})
    resident, host = cache
    base = simulate(arrivals, fifo, window=1, resident=resident, host=host)
    rows = []
    for window in windows:
        got = simulate(arrivals, partial(grouped, policy=policy), window=window, resident=resident, host=host)
        rows.append(
            f"| {popularity} | {adapters} | {resident}/{host} | {window} | {jobs} | {distinct} "
            f"| {base.cold_loads} / {base.host_loads} | {got.cold_loads} / {got.host_loads} "
            f"| {got.cold_loads / distinct:.2f} | {got.cold_loads / base.cold_loads:.2f} "
            f"| {(got.cold_loads + got.host_loads) / (base.cold_loads + base.host_loads):.2f} "
            f"| {base.max_wait_s:,.0f} / {base.median_wait_s:,.0f} "
            f"| {got.max_wait_s:,.0f} / {got.median_wait_s:,.0f} |"
        )
    return rows


DATASET_HEADER = (
    "| popularity | adapters | cache R/H | window | jobs | min loads (distinct) | file order: cold loads "
    "| grouped order: cold loads | grouped order: cold / min |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def bench_dataset(
    popularity: str, adapters: int, *, jobs: int, window: int, cache: tuple[int, int], policy: SchedulerPolicy
) -> str:
    """A whole dataset queued at once, in file order and in the client's grouped order: one row."""
    arrivals = make_arrivals(popularity, adapters, jobs)
    distinct = len({job.adapter for job in arrivals})
    resident, host = cache
    choose = partial(grouped, policy=policy)
    cold = [
        simulate(queued_at_once(arrivals, grouped=g), choose, window=window, resident=resident, host=host)
        for g in (False, True)
    ]
    cold = [result.cold_loads for result in cold]
    return (
        f"| {popularity} | {adapters} | {resident}/{host} | {window} | {jobs} | {distinct} "
        f"| {cold[0]} | {cold[1]} | {cold[1] / distinct:.2f} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs and workloads (a smoke run)")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=DEFAULT_MAX_WAIT_S,
        metavar="SECONDS",
        help="the scheduler's max_wait_s ('inf' turns the rule off); default %(default)g",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    try:
        policy = SchedulerPolicy(max_wait_s=args.max_wait)
    except ValueError as e:
        parser.error(str(e))

    started = time.perf_counter()
    print(HEADER)
    for popularity in ("uniform", "zipf"):
        for adapters in plan["adapters"]:
            for cache in plan["caches"]:
                rows = bench_workload(
                    popularity,
                    adapters,
                    jobs=plan["jobs"],
                    windows=plan["windows"],
                    cache=cache,
                    policy=policy,
                )
                print("\n".join(rows), flush=True)
    print("\nA whole dataset queued at once (window 64):\n")
    print(DATASET_HEADER)
    for popularity in ("uniform", "zipf"):
        for adapters in plan["adapters"]:
            for cache in plan["caches"]:
                row = bench_dataset(
                    popularity, adapters, jobs=plan["jobs"], window=64, cache=cache, policy=policy
                )
                print(row, flush=True)
    print(
        f"\nSimulated costs: cold load {COLD_LOAD_S} s, host load {HOST_LOAD_S} s, pipeline call {CALL_S} s "
        f"+ {IMAGE_S} s per image; mean arrival gap {MEAN_GAP_S} s; max_batch={policy.max_batch}, "
        f"max_wait_s={policy.max_wait_s:g}. Ran in {time.perf_counter() - started:.1f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
