"""The scheduler's choices: cheapest adapter first, bounded waits, homogeneous groups, every job once."""

import math
from collections.abc import Callable, Collection, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.scheduler import Pending, SchedulerPolicy, next_fifo, next_group

SQUARE = (32, 32, 2, 5.0, 1.0)
WIDE = (64, 32, 2, 5.0, 1.0)
POLICY = SchedulerPolicy(max_batch=8, max_wait_s=300.0)


def job(
    job_id: str, adapter: str | None, *, arrived: float = 0.0, priority: int = 5, key: tuple = SQUARE
) -> Pending:
    return Pending(job_id=job_id, adapter=adapter, batch_key=key, arrived=arrived, priority=priority)


def pick(
    pending: Sequence[Pending],
    *,
    resident: Collection[str] = (),
    host: Collection[str] = (),
    now: float = 0.0,
    policy: SchedulerPolicy = POLICY,
) -> list[str]:
    return [p.job_id for p in next_group(pending, resident=resident, host=host, now=now, policy=policy)]


def test_resident_beats_host_beats_cold() -> None:
    pending = [
        *(job(f"c{i}", "cold", arrived=0.0) for i in range(5)),
        *(job(f"h{i}", "warm", arrived=1.0) for i in range(3)),
        job("r0", "hot", arrived=2.0),
    ]
    tiers = {"resident": {"hot"}, "host": {"hot", "warm"}}  # the engine's host tier counts resident ones

    assert pick(pending, **tiers) == ["r0"]
    pending = [p for p in pending if p.adapter != "hot"]
    assert pick(pending, **tiers) == ["h0", "h1", "h2"]
    pending = [p for p in pending if p.adapter != "warm"]
    assert pick(pending, **tiers) == ["c0", "c1", "c2", "c3", "c4"]


def test_among_cold_adapters_the_larger_group_goes_first() -> None:
    pending = [job("a0", "a", arrived=0.0), job("a1", "a", arrived=1.0)]
    pending += [job(f"b{i}", "b", arrived=10.0 + i) for i in range(3)]

    assert pick(pending, now=20.0) == ["b0", "b1", "b2"]


def test_equal_groups_go_by_their_most_urgent_job() -> None:
    pending = [job("b0", "b", arrived=5.0), job("a0", "a", arrived=9.0), job("a1", "a", arrived=1.0)]
    pending += [job("c0", "c", arrived=0.0, priority=9)]
    # a and b tie on tier; a has more jobs. Without a, the urgent c0 beats the older b0.
    assert pick(pending, now=10.0) == ["a1", "a0"]
    assert pick([p for p in pending if p.adapter != "a"], now=10.0) == ["c0"]


def test_groups_are_capped_and_split_by_batch_key() -> None:
    pending = [job(f"s{i}", "a", arrived=float(i), key=SQUARE) for i in range(10)]
    pending += [job(f"w{i}", "a", arrived=100.0 + i, key=WIDE) for i in range(3)]
    policy = SchedulerPolicy(max_batch=4)

    assert pick(pending, resident={"a"}, now=200.0, policy=policy) == ["s0", "s1", "s2", "s3"]
    pending = [p for p in pending if p.batch_key == WIDE]
    assert pick(pending, resident={"a"}, now=200.0, policy=policy) == ["w0", "w1", "w2"]


def test_within_an_adapter_the_group_of_its_most_urgent_job_goes_first() -> None:
    pending = [job(f"s{i}", "a", arrived=10.0 + i, key=SQUARE) for i in range(3)]
    pending += [job("w0", "a", arrived=0.0, key=WIDE)]
    assert pick(pending, now=20.0) == ["w0"]

    pending += [job("s9", "a", arrived=19.0, priority=9, key=SQUARE)]  # deadline 79 s beats w0's 300 s
    assert pick(pending, now=20.0) == ["s9", "s0", "s1", "s2"]


def test_base_model_jobs_count_as_resident() -> None:
    pending = [job("base", None, arrived=5.0)] + [job(f"c{i}", "cold", arrived=float(i)) for i in range(5)]
    assert pick(pending, now=10.0) == ["base"]
    assert pick(pending, host={"cold"}, now=10.0) == ["base"]


def test_an_overdue_job_goes_next_even_if_cold() -> None:
    pending = [job("old", "cold", arrived=0.0)] + [job(f"r{i}", "hot", arrived=100.0 + i) for i in range(6)]

    assert pick(pending, resident={"hot"}, now=300.0)[0] == "r0"  # at its deadline, not past it
    assert pick(pending, resident={"hot"}, now=300.5) == ["old"]


def test_overdue_jobs_go_earliest_deadline_first() -> None:
    pending = [job("p5", "a", arrived=0.0), job("p9", "b", arrived=200.0, priority=9)]
    # Deadlines: p5 at 300 s, p9 at 260 s; both overdue at 400 s.
    assert pick(pending, resident={"a"}, now=400.0) == ["p9"]


def test_higher_priority_jobs_become_overdue_sooner() -> None:
    deadlines = {p: POLICY.deadline(job("x", "a", arrived=10.0, priority=p)) for p in (0, 5, 9)}
    assert deadlines == {0: 610.0, 5: 310.0, 9: 70.0}

    pending = [job("urgent", "cold", arrived=0.0, priority=9), job("r0", "hot", arrived=0.0)]
    assert pick(pending, resident={"hot"}, now=59.0) == ["r0"]
    assert pick(pending, resident={"hot"}, now=61.0) == ["urgent"]


def test_max_wait_can_be_switched_off() -> None:
    pending = [job("old", "cold", arrived=0.0), job("r0", "hot", arrived=0.0)]
    policy = SchedulerPolicy(max_wait_s=math.inf)
    assert pick(pending, resident={"hot"}, now=1e9, policy=policy) == ["r0"]


def test_empty_window_gives_an_empty_group() -> None:
    assert pick([]) == []
    assert next_fifo([]) == []


def test_fifo_runs_the_earliest_arrival_alone() -> None:
    pending = [job("b", "x", arrived=1.0), job("a", "y", arrived=1.0), job("c", "x", arrived=0.5)]
    assert [p.job_id for p in next_fifo(pending)] == ["c"]
    assert [p.job_id for p in next_fifo(pending[:2])] == ["a"]


@pytest.mark.parametrize("priority", [-1, 10])
def test_priority_out_of_range_is_rejected(priority: int) -> None:
    with pytest.raises(ValueError, match=rf"'j1'.*priority must be 0\.\.9.*got {priority}"):
        job("j1", "a", priority=priority)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0}, "max_batch must be >= 1, got 0"),
        ({"max_wait_s": 0.0}, "max_wait_s must be > 0"),
        ({"max_wait_s": math.nan}, "max_wait_s must be > 0"),
    ],
)
def test_bad_policy_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SchedulerPolicy(**kwargs)


def test_payload_rides_along_without_affecting_equality() -> None:
    a = Pending(job_id="j", adapter="a", batch_key=SQUARE, arrived=0.0, payload={"message": 1})
    b = Pending(job_id="j", adapter="a", batch_key=SQUARE, arrived=0.0, payload={"message": 2})
    assert a == b
    assert next_group([a], resident=(), host=(), now=0.0, policy=POLICY)[0].payload == {"message": 1}


def count_loads(pending: list[Pending], choose: Callable[[list[Pending], str | None], list[Pending]]) -> int:
    """Drain `pending` through an engine that holds one adapter; count the loads."""
    loaded: str | None = None
    loads = 0
    while pending:
        group = choose(pending, loaded)
        if group[0].adapter != loaded:
            loaded = group[0].adapter
            loads += 1
        chosen = {p.job_id for p in group}
        pending = [p for p in pending if p.job_id not in chosen]
    return loads


def test_grouping_needs_one_load_per_adapter_where_fifo_needs_one_per_job() -> None:
    pending = [job(f"j{i:02d}", f"lora-{i % 6}", arrived=float(i)) for i in range(60)]

    def grouped(window: list[Pending], loaded: str | None) -> list[Pending]:
        held = {loaded} if loaded else set()
        return next_group(window, resident=held, host=held, now=60.0, policy=POLICY)

    assert count_loads(pending, grouped) == 6
    assert count_loads(pending, lambda window, loaded: next_fifo(window)) == 60


ADAPTERS = st.sampled_from([None, "a", "b", "c", "d"])


@st.composite
def windows(draw: st.DrawFn) -> list[Pending]:
    size = draw(st.integers(0, 40))
    return [
        Pending(
            job_id=f"j{i}",
            adapter=draw(ADAPTERS),
            batch_key=draw(st.sampled_from([SQUARE, WIDE])),
            arrived=draw(st.floats(0.0, 1000.0)),
            priority=draw(st.integers(0, 9)),
        )
        for i in range(size)
    ]


POLICIES = st.builds(
    SchedulerPolicy, max_batch=st.integers(1, 6), max_wait_s=st.sampled_from([1.0, 200.0, math.inf])
)
NAMES = st.sets(st.sampled_from(["a", "b", "c", "d"]))


@settings(max_examples=200, deadline=None)
@given(window=windows(), resident=NAMES, host=NAMES, policy=POLICIES, now=st.floats(0.0, 2000.0))
def test_draining_a_window_returns_every_job_once_in_homogeneous_groups(
    window: list[Pending], resident: set[str], host: set[str], policy: SchedulerPolicy, now: float
) -> None:
    left, seen = list(window), []
    for _ in range(len(window)):  # each call removes at least one job, so this many calls suffice
        if not left:
            break
        group = next_group(left, resident=resident, host=host, now=now, policy=policy)
        assert 1 <= len(group) <= policy.max_batch
        assert len({(p.adapter, p.batch_key) for p in group}) == 1
        ids = [p.job_id for p in group]
        assert len(set(ids)) == len(ids)
        assert set(ids) <= {p.job_id for p in left}
        seen += ids
        left = [p for p in left if p.job_id not in set(ids)]
        now += 10.0
    assert left == []
    assert sorted(seen) == sorted(p.job_id for p in window)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), window=windows(), resident=NAMES, host=NAMES, policy=POLICIES, now=st.floats(0, 2000))
def test_the_answer_does_not_depend_on_window_order(
    data: st.DataObject,
    window: list[Pending],
    resident: set[str],
    host: set[str],
    policy: SchedulerPolicy,
    now: float,
) -> None:
    shuffled = data.draw(st.permutations(window))
    kwargs = {"resident": resident, "host": host, "now": now, "policy": policy}
    assert next_group(shuffled, **kwargs) == next_group(window, **kwargs)


@settings(max_examples=200, deadline=None)
@given(window=windows(), resident=NAMES, host=NAMES, policy=POLICIES, now=st.floats(0, 2000))
def test_the_earliest_overdue_job_always_runs_next(
    window: list[Pending], resident: set[str], host: set[str], policy: SchedulerPolicy, now: float
) -> None:
    overdue = [policy.deadline(p) for p in window if now > policy.deadline(p)]
    group = next_group(window, resident=resident, host=host, now=now, policy=policy)
    if overdue:
        assert policy.deadline(group[0]) == min(overdue)


def test_upcoming_cold_adapters_follow_the_order_groups_will_run_in() -> None:
    from worker.scheduler import upcoming_cold_adapters

    pending = [
        *(job(f"a{i}", "a", arrived=0.0) for i in range(2)),
        *(job(f"b{i}", "b", arrived=0.0) for i in range(5)),
        *(job(f"c{i}", "c", arrived=0.0) for i in range(3)),
        job("h0", "held", arrived=0.0),
        job("n0", None, arrived=0.0),
    ]
    ahead = upcoming_cold_adapters(pending, resident=(), host={"held"}, now=0.0, policy=POLICY, limit=2)
    # Held and base-model jobs need no read; cold ones go by jobs waiting, as next_group picks them.
    assert ahead == ["b", "c"]
    everything = upcoming_cold_adapters(pending, resident=(), host={"held"}, now=0.0, policy=POLICY, limit=9)
    assert everything == ["b", "c", "a"]
    assert upcoming_cold_adapters([], resident=(), host=(), now=0.0, policy=POLICY, limit=2) == []


def test_upcoming_cold_adapters_include_those_a_call_mixes_in() -> None:
    from worker.scheduler import upcoming_cold_adapters

    pending = [
        *(mixable(f"a{i}", "a") for i in range(7)),
        mixable("b0", "b"),
        *(mixable(f"c{i}", "c") for i in range(5)),
        *(mixable(f"d{i}", "d") for i in range(3)),
    ]
    # a's call takes b in; c's takes d in.
    ahead = upcoming_cold_adapters(pending, resident=(), host=(), now=0.0, policy=MIXING, limit=9)
    assert ahead == ["a", "b", "c", "d"]
    assert upcoming_cold_adapters(pending, resident=(), host=(), now=0.0, policy=MIXING, limit=3) == [
        "a",
        "b",
        "c",
    ]


def mixable(job_id: str, adapter: str | None, *, arrived: float = 0.0, key: tuple = SQUARE) -> Pending:
    """A job whose call may mix adapters: its call key is its batch key without the scale."""
    return Pending(job_id=job_id, adapter=adapter, batch_key=key, arrived=arrived, call_key=key[:-1])


MIXING = SchedulerPolicy(max_batch=8, max_wait_s=300.0, mix_adapters=3)


def test_room_left_in_a_call_is_filled_with_held_adapters_fewest_jobs_first() -> None:
    pending = [
        *(mixable(f"a{i}", "a") for i in range(3)),
        *(mixable(f"b{i}", "b", arrived=1.0) for i in range(2)),
        mixable("c0", "c", arrived=2.0),
        mixable("n0", None, arrived=3.0),
        mixable("cold0", "cold"),
        mixable("w0", "w", key=WIDE),
    ]
    six = SchedulerPolicy(max_batch=6, max_wait_s=300.0, mix_adapters=3)
    # a's 3 jobs, then c's one and the base model's one, then one of b's two: 6 in all, 3 adapters;
    # held adapters before the cold one, never the other call key.
    assert pick(pending, resident={"a", "b", "c"}, policy=six) == ["a0", "a1", "a2", "c0", "n0", "b0"]


def test_mixing_stops_at_mix_adapters() -> None:
    pending = [mixable("a0", "a"), mixable("b0", "b"), mixable("c0", "c"), mixable("d0", "d")]
    two = SchedulerPolicy(max_batch=8, max_wait_s=300.0, mix_adapters=2)
    assert pick(pending, resident={"a", "b", "c", "d"}, policy=two) == ["a0", "b0"]
    assert pick(pending, resident={"a"}, host={"b"}, policy=two) == ["a0", "b0"]


def test_a_cold_adapter_is_mixed_in_only_whole_most_jobs_first() -> None:
    pending = [
        *(mixable(f"a{i}", "a") for i in range(3)),
        *(mixable(f"x{i}", "x") for i in range(6)),
        *(mixable(f"y{i}", "y") for i in range(4)),
        mixable("z0", "z"),
        mixable("yw0", "y", key=WIDE),
    ]
    # Room for 5 after a's 3: x's 6 do not fit (a second call would load x again), y's 4 (of this
    # call key) and z's one do.
    assert pick(pending, resident={"a"}, policy=MIXING) == ["a0", "a1", "a2", "y0", "y1", "y2", "y3", "z0"]
    # Jobs of one call key but two batch keys (scales) count together: with two more at another
    # scale, y's six no longer fit either.
    half = (*SQUARE[:-1], 0.5)
    pending += [mixable("yh0", "y", key=half), mixable("yh1", "y", key=half)]
    assert pick(pending, resident={"a"}, policy=MIXING) == ["a0", "a1", "a2", "z0"]
    # With one, they fit exactly: all five come in.
    chosen = pick(pending[:-1], resident={"a"}, policy=MIXING)
    assert chosen == ["a0", "a1", "a2", "y0", "y1", "y2", "y3", "yh0"]


def test_jobs_without_a_call_key_or_with_mixing_off_are_never_mixed() -> None:
    pending = [mixable("a0", "a"), mixable("b0", "b")]
    assert pick(pending, resident={"a", "b"}, policy=POLICY) == ["a0"]
    assert pick([job("a0", "a"), job("b0", "b")], resident={"a", "b"}, policy=MIXING) == ["a0"]


@st.composite
def mixable_windows(draw: st.DrawFn) -> list[Pending]:
    return [
        mixable(
            f"j{i}",
            draw(ADAPTERS),
            arrived=draw(st.floats(0.0, 1000.0)),
            key=draw(st.sampled_from([SQUARE, WIDE])),
        )
        for i in range(draw(st.integers(0, 40)))
    ]


@settings(max_examples=200, deadline=None)
@given(
    window=mixable_windows(),
    resident=NAMES,
    host=NAMES,
    mix=st.integers(1, 4),
    batch=st.integers(1, 6),
    now=st.floats(0, 2000),
)
def test_mixed_calls_share_one_call_key_and_never_add_a_load(
    window: list[Pending], resident: set[str], host: set[str], mix: int, batch: int, now: float
) -> None:
    policy = SchedulerPolicy(max_batch=batch, max_wait_s=200.0, mix_adapters=mix)
    left, seen, held = list(window), [], {*resident, *host}
    while left:
        group = next_group(left, resident=resident, host=held, now=now, policy=policy)
        assert 1 <= len(group) <= batch
        assert len({p.call_key for p in group}) == 1
        adapters = {p.adapter for p in group} - {None}
        assert len(adapters) <= mix
        seen += [p.job_id for p in group]
        left = [p for p in left if p.job_id not in {p.job_id for p in group}]
        for cold in adapters - held - {group[0].adapter}:
            # Mixed in whole: nothing of it left that could have shared this call.
            assert not [p for p in left if p.adapter == cold and p.call_key == group[0].call_key]
        held |= adapters  # a host cache that keeps everything
        now += 10.0
    assert sorted(seen) == sorted(p.job_id for p in window)
