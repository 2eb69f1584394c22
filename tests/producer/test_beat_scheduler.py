"""The beat scheduler in this process, with a real Redis and a clock the test sets.

Each test builds the app a `omni-batch beat` process builds; a new app on the same Redis is what a
restarted beat sees. The clock is the app's own time source (`app.now`), so which run is due, and
under which dataset, does not depend on when the test happens to run.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from fixtures.redis_server import free_port, queued_messages

from producer.beat import DatasetEntry, DatasetScheduler, make_beat_app
from producer.client import Client
from producer.errors import BrokerUnavailableError
from producer.run_ledger import RunLedger, RunState
from producer.schedule_file import load_schedules

T0 = datetime(2026, 11, 29, 14, 0, 0, tzinfo=UTC)


@pytest.fixture
def schedules(tmp_path: Path) -> list:
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        "  - name: heartbeat\n"
        "    every: 10s\n"
        "    jobs: [{prompt: a red fox}, {prompt: a blue bird, scale: 0.5}]\n"
        f"    output: {tmp_path / 'out'}\n"
    )
    return load_schedules(path)


class Beat:
    """One beat's app and scheduler at a time the test sets."""

    def __init__(self, schedules: list, redis_url: str, now: datetime) -> None:
        self.now = now
        self.app = make_beat_app(schedules, broker_url=redis_url, max_interval=1)
        self.app.now = lambda: self.now
        self.scheduler = DatasetScheduler(self.app)

    def entry(self) -> DatasetEntry:
        return DatasetEntry.from_key(DatasetEntry.generate_key(self.app, "heartbeat"), app=self.app)

    def tick(self) -> None:
        """What a beat's tick does for this entry: send it if it is due."""
        entry = self.entry()
        if entry.is_due()[0]:
            self.scheduler.apply_async(entry)

    def close(self) -> None:
        self.scheduler.close()


@pytest.fixture
def beats(schedules: list, redis_url: str):
    made: list[Beat] = []

    def start(now: datetime) -> Beat:
        made.append(Beat(schedules, redis_url, now))
        return made[-1]

    yield start
    for beat in made:
        beat.close()


def sent_datasets(redis_url: str) -> Counter:
    messages = queued_messages(redis.Redis.from_url(redis_url), "omni")
    assert len({m["headers"]["id"] for m in messages}) == len(messages), "a job was sent twice"
    return Counter(m["decoded_body"][0][0]["dataset"] for m in messages)


def test_a_new_schedule_waits_for_its_next_time_then_sends_each_run_once(beats, redis_url: str) -> None:
    beat = beats(T0 + timedelta(seconds=3))
    beat.tick()
    assert sent_datasets(redis_url) == {}  # 14:00:00 passed before the schedule existed

    beat.now = T0 + timedelta(seconds=10, milliseconds=20)
    beat.tick()
    beat.tick()  # the same run, a moment later
    beat.now = T0 + timedelta(seconds=19)
    beat.tick()
    assert sent_datasets(redis_url) == {"heartbeat-20261129T140010Z": 2}

    beat.now = T0 + timedelta(seconds=20)
    beat.tick()
    assert sent_datasets(redis_url) == {"heartbeat-20261129T140010Z": 2, "heartbeat-20261129T140020Z": 2}


def test_a_restarted_beat_does_not_send_a_run_already_sent(beats, redis_url: str) -> None:
    first = beats(T0 - timedelta(seconds=1))
    first.now = T0 + timedelta(seconds=1)
    first.tick()
    first.close()
    assert sent_datasets(redis_url) == {"heartbeat-20261129T140000Z": 2}

    restarted = beats(T0 + timedelta(seconds=2))  # the same run's time, a new process
    restarted.tick()
    assert sent_datasets(redis_url) == {"heartbeat-20261129T140000Z": 2}
    assert not restarted.entry().is_due()[0]


def test_a_run_sent_but_not_yet_marked_in_redbeat_is_not_sent_again(beats, redis_url: str) -> None:
    beat = beats(T0 - timedelta(seconds=1))
    beat.now = T0 + timedelta(seconds=1)
    beat.tick()
    # What a beat killed after sending the jobs, before RedBeat recorded the run, leaves behind.
    beat.entry().reschedule(last_run_at=T0 - timedelta(seconds=5))
    beat.close()

    restarted = beats(T0 + timedelta(seconds=2))
    assert restarted.entry().is_due()[0]
    restarted.tick()
    assert sent_datasets(redis_url) == {"heartbeat-20261129T140000Z": 2}
    assert not restarted.entry().is_due()[0]  # the run is recorded now


def test_a_run_another_beat_is_sending_waits_and_is_sent_if_that_beat_gives_up(beats, redis_url: str) -> None:
    beat = beats(T0 - timedelta(seconds=1))
    ledger = RunLedger(redis.Redis.from_url(redis_url, decode_responses=True))
    other, ours = ledger.claim("heartbeat", "heartbeat-20261129T140000Z", T0)
    assert ours

    beat.now = T0 + timedelta(seconds=1)
    beat.tick()
    assert sent_datasets(redis_url) == {}
    assert beat.entry().is_due()[0]  # still due: looked at again at the next tick

    ledger.release(other)  # the other beat died; its lease would lapse the same way
    beat.tick()
    assert sent_datasets(redis_url) == {"heartbeat-20261129T140000Z": 2}
    last = ledger.last_run("heartbeat")
    assert (last.state, last.dataset, last.jobs) == (RunState.SENT, "heartbeat-20261129T140000Z", 2)


def test_a_run_the_broker_refused_is_sent_at_the_next_tick(beats, redis_url: str) -> None:
    beat = beats(T0 - timedelta(seconds=1))
    beat.now = T0 + timedelta(seconds=1)
    beat.scheduler._client = Client(f"redis://127.0.0.1:{free_port()}/0")  # a broker nobody runs
    with pytest.raises(BrokerUnavailableError):
        beat.scheduler.apply_async(beat.entry())
    assert beat.entry().is_due()[0]
    assert redis.Redis.from_url(redis_url).keys("omni:scheduled-run:*") == []  # the claim was given up

    beat.scheduler._client = Client(redis_url)
    beat.tick()
    assert sent_datasets(redis_url) == {"heartbeat-20261129T140000Z": 2}


def test_runs_missed_while_no_beat_ran_are_sent_once_as_the_latest(beats, redis_url: str) -> None:
    beat = beats(T0 - timedelta(seconds=1))
    beat.now = T0 + timedelta(seconds=1)
    beat.tick()
    beat.close()

    later = beats(T0 + timedelta(seconds=35))  # 14:00:10, :20 and :30 passed with no beat
    later.tick()
    later.tick()
    assert sent_datasets(redis_url) == {"heartbeat-20261129T140000Z": 2, "heartbeat-20261129T140030Z": 2}


def test_a_beat_whose_redis_goes_away_as_it_starts_registers_its_schedule_once_redis_is_back(
    schedules: list, redis_server_factory
) -> None:
    server = redis_server_factory()
    server.stop()  # gone after the CLI's check, before RedBeat puts the schedule in Redis
    beat = Beat(schedules, server.url, T0)
    try:
        server.start()
        beat.scheduler.tick()
        assert beat.entry().name == "heartbeat"
    finally:
        beat.close()
