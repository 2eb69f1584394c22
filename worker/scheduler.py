"""Choose which jobs of the worker's window run next, so that each adapter is loaded as few times as possible.

Loading a LoRA into a large model costs seconds; switching between adapters already in the model
costs well under a millisecond (docs/architecture.md, "Why grouping pays"). So the scheduler runs
jobs whose adapter is resident first, then those whose adapter is in host memory, then cold ones,
and among cold adapters the one with the most jobs waiting, which a single load then serves. Jobs
with one adapter and one batch key share a pipeline call. A deadline per job (shorter for higher
priority) bounds how long any job is passed over.

The module is pure (no I/O, no clock, no torch): the Celery worker, the embedded runner and the
benchmarks pass the time in and share one policy.
"""

from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from math import isnan

from producer.defaults import DEFAULT_PRIORITY, MAX_PRIORITY
from worker.errors import SchedulingError

DEFAULT_MAX_BATCH = 8
# A full 64-job window under load holds a job for about window x seconds-per-job, and a much
# shorter max wait turns grouping back into deadline order (bench/scheduler.py --max-wait).
DEFAULT_MAX_WAIT_S = 900.0

# Adapter tiers, cheapest first.
_RESIDENT, _HOST, _COLD = 0, 1, 2


@dataclass(frozen=True, kw_only=True, slots=True)
class Pending:
    """A job in the window, reduced to what scheduling needs; the worker's own message rides in `payload`.

    `adapter` is None for the base model, which never needs a load. Jobs with the same adapter and equal
    `batch_key` (e.g. width, height, steps, guidance, scale) may share one pipeline call; jobs of any
    adapters and scales may share one that mixes adapters when their `call_key` is equal. `arrived` is
    when the worker took the job into its window, on the caller's monotonic clock: time spent in the
    broker before that is the broker's order, which grouping does not change. `job_id` is unique within
    a window (the worker drops redelivered duplicates).
    """

    job_id: str
    adapter: str | None
    batch_key: tuple[Hashable, ...]
    arrived: float
    priority: int = DEFAULT_PRIORITY
    call_key: tuple[Hashable, ...] | None = None  # equal: may share a call mixing adapters; None: never
    payload: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.priority <= MAX_PRIORITY:
            raise SchedulingError(
                f"Pending {self.job_id!r}: priority must be 0..{MAX_PRIORITY} ({MAX_PRIORITY} most urgent), "
                f"got {self.priority!r}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerPolicy:
    """How large a group may be and how long a job may wait before it goes next whatever the cost.

    `max_wait_s` is the allowed wait at the default priority 5; see `deadline` for other priorities.
    `math.inf` turns the max-wait rule off. Size it with the window: a job spends about
    window / throughput seconds in a full window, and a max wait much shorter than that marks most jobs
    overdue, which runs them in deadline order and gives up most of the grouping (`bench/scheduler.py
    --max-wait` shows the trade).
    """

    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    mix_adapters: int = 1  # adapters one call may mix (at most the engine's max_loras); 1: never mix

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise SchedulingError(f"SchedulerPolicy: max_batch must be >= 1, got {self.max_batch!r}")
        if self.mix_adapters < 1:
            raise SchedulingError(f"SchedulerPolicy: mix_adapters must be >= 1, got {self.mix_adapters!r}")
        if isnan(self.max_wait_s) or self.max_wait_s <= 0:
            raise SchedulingError(
                f"SchedulerPolicy: max_wait_s must be > 0 (math.inf for no limit), got {self.max_wait_s!r}"
            )

    def deadline(self, job: Pending) -> float:
        """When `job` becomes overdue: `max_wait_s * (10 - priority) / 5` after it arrived.

        So the default priority 5 waits `max_wait_s`, priority 9 a fifth of it, priority 0 twice it.
        """
        return job.arrived + self.max_wait_s * (10 - job.priority) / 5


def next_group(
    pending: Sequence[Pending],
    *,
    resident: Collection[str],
    host: Collection[str],
    now: float,
    policy: SchedulerPolicy,
) -> list[Pending]:
    """The jobs to run next: one adapter, one batch key, at most `policy.max_batch`, most urgent first;
    with `policy.mix_adapters` > 1, room left in the call is filled with jobs of other adapters (see
    `_mixed_in`).

    `resident` names the adapters in the model, `host` those in host memory (it may include the resident
    ones); any other adapter is cold. Urgency orders jobs by deadline, then higher priority, then earlier
    arrival, then job id, so the answer does not depend on the order of `pending`. Empty window, empty
    group. O(n log n) in the window's size.
    """
    if not pending:
        return []

    def urgency(job: Pending) -> tuple[float, int, float, str]:
        return (policy.deadline(job), -job.priority, job.arrived, job.job_id)

    # 1. An overdue job goes next, earliest deadline first, whatever its adapter costs: this bounds waits.
    anchor = min(pending, key=urgency)
    if now <= policy.deadline(anchor):
        # 2. Otherwise the cheapest adapter; among equals, the one with the most jobs waiting (one load
        #    serves them all, and a busy adapter stays resident), then the one with the most urgent job.
        by_adapter: dict[str | None, list[Pending]] = {}
        for job in pending:
            by_adapter.setdefault(job.adapter, []).append(job)

        def cost(adapter: str | None, jobs: list[Pending]) -> tuple[int, int]:
            if adapter is None or adapter in resident:
                tier = _RESIDENT
            elif adapter in host:
                tier = _HOST
            else:
                tier = _COLD
            return tier, -len(jobs)

        costs = {adapter: cost(adapter, jobs) for adapter, jobs in by_adapter.items()}
        cheapest = min(costs.values())
        anchor = min(
            (min(jobs, key=urgency) for adapter, jobs in by_adapter.items() if costs[adapter] == cheapest),
            key=urgency,
        )

    # 3. The anchor's batch-key group within its adapter, most urgent first, up to the batch size.
    group = [job for job in pending if job.adapter == anchor.adapter and job.batch_key == anchor.batch_key]
    group.sort(key=urgency)
    group = group[: policy.max_batch]
    # 4. Room left: jobs that can share the call (one call key): held adapters', the base model's, or a
    #    cold adapter's whole.
    if policy.mix_adapters > 1 and anchor.call_key is not None and len(group) < policy.max_batch:
        group += _mixed_in(pending, group, {*resident, *host}, policy, urgency)
    return group


def _mixed_in(
    pending: Sequence[Pending],
    group: list[Pending],
    held: Collection[str],
    policy: SchedulerPolicy,
    urgency: Callable[[Pending], tuple],
) -> list[Pending]:
    """Jobs to fill `group`'s call with, adapter by adapter: first the base model's and adapters held
    already, fewest jobs first (a small group gains most from sharing a call, a large one fills a
    call of its own later), then cold adapters whose jobs all fit, most jobs first. A cold adapter
    comes in whole, so its one load serves every job of it that could share this call, as a call
    of its own would: mixing saves calls and adds no load.
    """
    anchor = group[0]
    chosen = {job.job_id for job in group}
    adapters = {anchor.adapter} - {None}
    candidates: dict[str | None, list[Pending]] = {}
    for job in pending:
        if job.job_id not in chosen and job.call_key == anchor.call_key:
            candidates.setdefault(job.adapter, []).append(job)

    def rank(item: tuple[str | None, list[Pending]]) -> tuple[bool, int, tuple]:
        adapter, jobs = item
        cold = adapter is not None and adapter not in held and adapter not in adapters
        return cold, -len(jobs) if cold else len(jobs), min(map(urgency, jobs))

    room, added = policy.max_batch - len(group), []
    for adapter, jobs in sorted(candidates.items(), key=rank):
        if room == 0:
            break
        if adapter is not None and adapter not in adapters:
            if len(adapters) == policy.mix_adapters or (adapter not in held and len(jobs) > room):
                continue
            adapters.add(adapter)
        jobs.sort(key=urgency)
        added += jobs[:room]
        room -= len(jobs[:room])
    return added


def take_next_group(
    window: list[Pending],
    *,
    resident: Collection[str],
    host: Collection[str],
    now: float,
    policy: SchedulerPolicy,
) -> list[Pending]:
    """`next_group`, removed from `window`: what a worker does with its window before each run."""
    group = next_group(window, resident=resident, host=host, now=now, policy=policy)
    chosen = {job.job_id for job in group}
    window[:] = [job for job in window if job.job_id not in chosen]
    return group


def next_fifo(pending: Sequence[Pending]) -> list[Pending]:
    """The baseline a worker without grouping follows: the earliest arrival alone (ties by job id)."""
    return [min(pending, key=lambda job: (job.arrived, job.job_id))] if pending else []


def upcoming_cold_adapters(
    pending: Sequence[Pending],
    *,
    resident: Collection[str],
    host: Collection[str],
    now: float,
    policy: SchedulerPolicy,
    limit: int,
) -> list[str]:
    """The cold adapters the next groups will need, in the order `next_group` would pick them.

    What a worker reads ahead while the current group computes: the window is played forward
    with each chosen adapter (a call's anchor, and any mixed in) counted as held from then on,
    until `limit` cold ones are found.
    """
    remaining, held, found = list(pending), {*resident, *host}, []
    while remaining and len(found) < limit:
        group = next_group(remaining, resident=resident, host=held, now=now, policy=policy)
        for adapter in dict.fromkeys(job.adapter for job in group):
            if adapter is not None and adapter not in held:
                found.append(adapter)
                held.add(adapter)
        chosen = {job.job_id for job in group}
        remaining = [job for job in remaining if job.job_id not in chosen]
    return found[:limit]
