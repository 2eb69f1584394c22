"""What a worker takes next: its current shard first; another's backlog when it has nothing to do."""

from __future__ import annotations

from worker.affinity import AffinityPolicy
from worker.stealing import QueueState, steal_count, steal_target, take_order

POLICY = AffinityPolicy(steal_after_s=30.0)


def queue(name: str, backlog: int, *, age: float = 0.0, owners: int = 1, room: int = 64) -> QueueState:
    return QueueState(name=name, backlog=backlog, head_age_s=age, owners=owners, owners_room=room)


def test_an_idle_worker_steals_from_the_longest_backlog_its_owners_cannot_take() -> None:
    queues = [
        queue("omni.a.1", 100, owners=1, room=0),  # its owner's window is full
        queue("omni.a.2", 300, owners=2, room=10),
        queue("omni.a.3", 5, age=45.0),  # its owner is busy: its oldest job has waited 45 s
    ]

    assert steal_target(queues, own=(), policy=POLICY).name == "omni.a.2"
    assert steal_target(queues, own={"omni.a.2"}, policy=POLICY).name == "omni.a.1"
    assert steal_target(queues[2:], own=(), policy=POLICY).name == "omni.a.3"


def test_jobs_their_owners_will_take_at_once_are_left_to_them() -> None:
    queues = [queue("omni.a.1", 3, age=2.0, room=64), queue("omni.a.2", 0, age=99.0, room=0)]

    assert steal_target(queues, own=(), policy=POLICY) is None


def test_equal_backlogs_go_by_the_oldest_job_then_by_name() -> None:
    queues = [queue("omni.a.2", 9, age=40.0), queue("omni.a.1", 9, age=40.0), queue("omni.a.3", 9, age=50.0)]
    assert steal_target(queues, own=(), policy=POLICY).name == "omni.a.3"
    assert steal_target(queues[:2], own=(), policy=POLICY).name == "omni.a.1"


def test_a_thief_takes_one_more_owners_share_at_most_its_room() -> None:
    assert steal_count(queue("q", 90, owners=2), room=64) == 30
    assert steal_count(queue("q", 500, owners=1), room=64) == 64
    assert steal_count(queue("q", 7, owners=0), room=64) == 7  # its owner died: all of it
    assert steal_count(queue("q", 1, owners=5), room=64) == 1


def test_a_worker_finishes_the_queue_it_took_from_last_before_opening_another() -> None:
    last = {"omni.a.5": 10.0, "omni.a.2": 30.0, "omni": 20.0}
    queues = ["omni", "omni.a.1", "omni.a.2", "omni.a.3", "omni.a.5"]

    order = take_order(queues, last_taken=last, waited={}, policy=POLICY)
    assert order == ["omni.a.2", "omni", "omni.a.5", "omni.a.1", "omni.a.3"]
    assert take_order(queues, last_taken={}, waited={}, policy=POLICY) == queues


def test_a_queue_whose_oldest_job_has_waited_goes_first_the_oldest_first() -> None:
    last = {"omni.a.2": 30.0}
    waited = {"omni.a.1": 31.0, "omni.a.2": 5.0, "omni.a.3": 90.0, "omni.a.5": 29.0}
    queues = ["omni.a.1", "omni.a.2", "omni.a.3", "omni.a.5"]

    order = take_order(queues, last_taken=last, waited=waited, policy=POLICY)
    assert order == ["omni.a.3", "omni.a.1", "omni.a.2", "omni.a.5"]
