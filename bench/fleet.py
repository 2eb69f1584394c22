"""How many adapter loads a fleet of workers makes, and how long its jobs wait, under three policies.

    python bench/fleet.py [--quick]

Simulated, not measured (bench/fleet_model.py): N workers, each with bench/scheduler.py's model of
the engine's cache (4 resident, 16 held) and its costs, and a window of OMNI_WINDOW jobs grouped by
the real `worker.scheduler`; seeded, so every run prints the same tables. The policies:

- FIFO: one shared queue; each worker takes one job at a time and runs it alone.
- window: today's worker. One shared queue; each worker reserves jobs as its window has room and
  groups within its window.
- affinity: `worker.affinity` and `worker.stealing`. A job travels on its adapter's shard queue; a
  coordinator plans the owners of every shard each `replan_s` from what was taken, what is queued
  and what the workers hold; a worker reserves jobs from the queues it owns in `take_order` and
  groups within its window, and one with nothing to do steals. Heartbeats, Redis round trips and
  the plan's distribution are free and instant here.

A job's wait runs from its enqueueing to the start of its pipeline call, any load included.
Workloads: Poisson arrivals at a utilisation (arrival rate x (CALL_S + IMAGE_S) / N: at 100% the
fleet would be busy all the time if it never loaded an adapter and never batched), or a whole
dataset queued at once in the order the client publishes it (`grouped_order`); optionally some
workers stopped halfway.

Reports cold loads against the fleet's lower bound (docs/scheduling.md): each adapter once, or on
as many workers as its share of the jobs needs if no worker does more than the mean; waits (p50,
p99, max); the busiest worker's jobs over the mean, over the workers that ran to the end; job runs
(above the jobs when a stopped worker's jobs ran again); jobs stolen; and the (shard, owner) pairs
the plans added for busy shards after the first plan (moves: each may cost a load).
"""

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from fleet_model import CACHE, Affinity, Sharing, Simulation
from scheduler import CALL_S, IMAGE_S, Arrival, fifo, grouped, make_arrivals, queued_at_once

from worker.affinity import AffinityPolicy, lower_bound
from worker.scheduler import SchedulerPolicy
from worker.settings import DEFAULT_WINDOW

POLICIES = ("FIFO", "window", "affinity")


@dataclass(frozen=True)
class Scenario:
    """One workload on one fleet. `utilisation` None: the whole dataset is queued at time 0."""

    popularity: str
    adapters: int
    workers: int
    jobs: int
    utilisation: float | None
    stopped: int = 0  # workers stopped when half the jobs have arrived

    def arrivals(self) -> list[Arrival]:
        """bench/scheduler.py's stream for this many adapters, at this fleet's rate."""
        if self.utilisation is None:
            return queued_at_once(make_arrivals(self.popularity, self.adapters, self.jobs), grouped=True)
        gap = (CALL_S + IMAGE_S) / (self.workers * self.utilisation)
        return make_arrivals(self.popularity, self.adapters, self.jobs, mean_gap_s=gap)


@dataclass(frozen=True)
class Outcome:
    """What one policy did with one scenario."""

    cold_loads: int
    p50_wait_s: float
    p99_wait_s: float
    max_wait_s: float
    share: float  # the busiest worker's jobs over the mean
    runs: int  # pipeline runs of a job: above the jobs when a stopped worker's jobs ran again
    stolen: int
    moves: int


def simulate(
    scenario: Scenario,
    arrivals: Sequence[Arrival],
    policy: str,
    *,
    scheduler: SchedulerPolicy,
    affinity: AffinityPolicy,
) -> Outcome:
    """Run one scenario's jobs under one policy."""
    grouping = partial(grouped, policy=scheduler)
    sharing, window, choose = {
        "FIFO": (Sharing(), 1, fifo),
        "window": (Sharing(), DEFAULT_WINDOW, grouping),
        "affinity": (Affinity(affinity), DEFAULT_WINDOW, grouping),
    }[policy]
    sim = Simulation(arrivals, sharing, workers=scenario.workers, window=window, choose=choose)
    if scenario.stopped:
        sim.stop_at_half(scenario.stopped)
    sim.run()
    waits = statistics.quantiles(sim.waits.values(), n=100, method="inclusive")
    served = [worker.served for worker in sim.workers if worker.alive]
    return Outcome(
        cold_loads=sum(worker.cache.cold_loads for worker in sim.workers),
        p50_wait_s=waits[49],
        p99_wait_s=waits[98],
        max_wait_s=max(sim.waits.values()),
        share=max(served) / statistics.fmean(served),
        runs=sim.runs,
        stolen=sharing.stolen,
        moves=sharing.moves,
    )


HEADER = (
    "| popularity | adapters | workers | arrivals | stopped | jobs | lower bound | policy | cold loads "
    "| cold / bound | wait p50 / p99 / max (s) | p99 / window's | max share | runs | stolen | moves |\n"
    "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def rows(scenario: Scenario, *, scheduler: SchedulerPolicy, affinity: AffinityPolicy) -> list[str]:
    """One Markdown row per policy."""
    arrivals = scenario.arrivals()
    bound = lower_bound([job.adapter for job in arrivals], scenario.workers - scenario.stopped)
    load = "at once" if scenario.utilisation is None else f"Poisson {scenario.utilisation:.0%}"
    got = {p: simulate(scenario, arrivals, p, scheduler=scheduler, affinity=affinity) for p in POLICIES}
    lines = []
    for policy, out in got.items():
        cells = [
            scenario.popularity,
            f"{scenario.adapters:,}",
            f"{scenario.workers:,}",
            load,
            str(scenario.stopped),
            f"{scenario.jobs:,}",
            f"{bound:,}",
            policy,
            f"{out.cold_loads:,}",
            f"{out.cold_loads / bound:.2f}",
            f"{out.p50_wait_s:,.0f} / {out.p99_wait_s:,.0f} / {out.max_wait_s:,.0f}",
            f"{out.p99_wait_s / got['window'].p99_wait_s:.2f}",
            f"{out.share:.2f}",
            f"{out.runs:,}",
            f"{out.stolen:,}",
            f"{out.moves:,}",
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def scenarios(*, quick: bool) -> dict[str, list[Scenario]]:
    """The tables: title -> scenarios. Most runs give each worker 600 jobs (about 38 simulated
    minutes at 80%); one worker gets bench/scheduler.py's 5,000, and 1,000 workers a quarter of
    600 (ten minutes), so that the whole run takes minutes."""
    if quick:
        return {
            "Poisson arrivals": [Scenario("zipf", 100, 10, 1500, 0.8), Scenario("zipf", 1000, 20, 3000, 0.8)],
            "A whole dataset queued at once": [Scenario("zipf", 100, 1, 1000, None)],
            "Workers stopped halfway": [Scenario("zipf", 100, 10, 1500, 0.8, stopped=2)],
        }
    per = 600  # jobs per worker: at 80%, about 38 minutes
    return {
        "Poisson arrivals": [
            Scenario("zipf", 1000, 100, 100 * per, 0.8),
            Scenario("zipf", 1000, 100, 100 * per, 0.5),
            Scenario("zipf", 1000, 100, 100 * per, 0.9),
            Scenario("uniform", 1000, 100, 100 * per, 0.8),
            Scenario("zipf", 10, 100, 100 * per, 0.8),
            Scenario("zipf", 10000, 100, 100 * per, 0.8),
            Scenario("zipf", 100, 1, 5000, 0.8),
            Scenario("zipf", 100, 10, 10 * per, 0.8),
            Scenario("zipf", 10000, 1000, 1000 * per // 4, 0.8),
        ],
        "A whole dataset queued at once": [
            *(Scenario(p, a, 1, 5000, None) for p in ("zipf", "uniform") for a in (10, 100, 1000)),
            *(Scenario(p, 1000, 10, 10 * per, None) for p in ("zipf", "uniform")),
            *(Scenario(p, a, 100, 100 * per, None) for p in ("zipf", "uniform") for a in (1000, 10000)),
        ],
        "Workers stopped halfway": [Scenario("zipf", 1000, 100, 100 * per, 0.8, stopped=10)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small fleets and few jobs (a smoke run)")
    args = parser.parse_args(argv)
    scheduler, affinity = SchedulerPolicy(), AffinityPolicy()
    started = time.perf_counter()
    for title, group in scenarios(quick=args.quick).items():
        print(f"\n{title}:\n\n{HEADER}")
        for scenario in group:
            print("\n".join(rows(scenario, scheduler=scheduler, affinity=affinity)), flush=True)
    print(
        f"\nOMNI_WINDOW={DEFAULT_WINDOW}, cache {CACHE[0]}/{CACHE[1]}, max_batch={scheduler.max_batch}, "
        f"max_wait_s={scheduler.max_wait_s:g}; {affinity}. Ran in {time.perf_counter() - started:.1f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
