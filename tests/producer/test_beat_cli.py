"""`omni-batch beat` and `omni-batch schedule list` as processes, against a real redis-server.

Beats run a schedule that fires every two seconds. Tests wait on what Redis holds (the queued jobs,
the run records) with a deadline, never on a sleep.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from fixtures.beat_process import BeatProcess, beat_flags
from fixtures.command_process import OMNI_BATCH
from fixtures.redis_server import queued_messages

from producer import settings

RUN_TIMEOUT_S = 60.0
POLL_S = 0.1


@pytest.fixture(autouse=True)
def _no_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.ENV_BROKER_URL, raising=False)
    monkeypatch.delenv(settings.ENV_ADAPTER_ROOTS, raising=False)


@pytest.fixture
def schedule_file(tmp_path: Path) -> Path:
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        "  - name: heartbeat\n"
        "    every: 2s\n"
        "    jobs:\n"
        "      - {prompt: a red fox}\n"
        "      - {prompt: a blue bird, scale: 0.5}\n"
        f"    output: {tmp_path / 'out'}\n"
    )
    return path


def queued(redis_url: str) -> Counter:
    """Jobs queued per dataset; fails if any job id was sent twice."""
    messages = queued_messages(redis.Redis.from_url(redis_url), "omni")
    ids = Counter(m["headers"]["id"] for m in messages)
    assert max(ids.values(), default=1) == 1, f"jobs sent twice: {[i for i, n in ids.items() if n > 1]}"
    return Counter(m["decoded_body"][0][0]["dataset"] for m in messages)


def wait_for_runs(redis_url: str, count: int, *beats: BeatProcess) -> Counter:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(runs := queued(redis_url)) < count:
        for beat in beats:
            assert beat.proc.poll() is None, f"beat exited ({beat.proc.returncode}):\n{beat.log}"
        assert time.monotonic() < deadline, f"only {len(runs)} runs were sent:\n" + "\n".join(
            b.log for b in beats
        )
        time.sleep(POLL_S)  # polling Redis with a deadline
    return runs


def test_two_beats_at_once_send_each_run_once(start_beat, schedule_file: Path, redis_url: str) -> None:
    first = start_beat(*beat_flags(schedule_file, redis_url))
    second = start_beat(*beat_flags(schedule_file, redis_url))
    runs = wait_for_runs(redis_url, 3, first, second)
    assert first.stop() == 0 and second.stop() == 0

    runs = queued(redis_url)
    assert all(n == 2 for n in runs.values()), runs  # each run's two jobs, once
    assert all(name.startswith("heartbeat-") for name in runs)
    # One beat held the lock the whole time; the other never sent anything.
    assert sorted([len(first.sent()), len(second.sent())])[0] == 0
    assert sorted(first.sent() + second.sent()) == sorted(runs)


def test_a_beat_killed_is_replaced_without_sending_its_runs_again(
    start_beat, schedule_file: Path, redis_url: str
) -> None:
    first = start_beat(*beat_flags(schedule_file, redis_url))
    wait_for_runs(redis_url, 1, first)
    first.stop(signal.SIGKILL)  # no clean shutdown: its lock lapses after 5 x max-interval
    before = queued(redis_url)

    second = start_beat(*beat_flags(schedule_file, redis_url))
    runs = wait_for_runs(redis_url, len(before) + 1, second)
    assert second.stop() == 0
    assert all(n == 2 for n in queued(redis_url).values())
    assert second.sent() and not set(second.sent()) & set(before)
    assert min(second.sent()) > max(before)  # stamps sort as times: only later runs
    assert set(runs) >= set(before)


def test_schedule_list_shows_the_next_and_the_last_run(
    start_beat, schedule_file: Path, redis_url: str
) -> None:
    listing = [str(OMNI_BATCH), "schedule", "list", "--schedule", str(schedule_file), "--broker", redis_url]
    before = json.loads(
        subprocess.run([*listing, "--json"], capture_output=True, text=True, check=True).stdout
    )
    (row,) = before["schedules"]
    assert (before["beat_running"], row["name"], row["jobs"], row["last_run"]) == (
        False,
        "heartbeat",
        2,
        None,
    )
    assert row["trigger"] == {"every": "2s"} and row["next_dataset"].startswith("heartbeat-")

    beat = start_beat(*beat_flags(schedule_file, redis_url))
    wait_for_runs(redis_url, 1, beat)
    during = json.loads(
        subprocess.run([*listing, "--json"], capture_output=True, text=True, check=True).stdout
    )
    assert during["beat_running"] is True
    assert beat.stop() == 0

    after = json.loads(
        subprocess.run([*listing, "--json"], capture_output=True, text=True, check=True).stdout
    )
    last = after["schedules"][0]["last_run"]
    assert after["beat_running"] is False  # a beat that stops gives its lock up
    assert (last["dataset"], last["jobs"]) == (max(queued(redis_url)), 2)
    text = subprocess.run(listing, capture_output=True, text=True, check=True).stdout
    assert "no beat is running" in text and f"last: {last['dataset']} (2 jobs" in text


def test_a_bad_schedules_file_is_refused_whole_before_anything_is_sent(
    tmp_path: Path, redis_url: str
) -> None:
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n"
        "  - name: nightly\n"
        "    cron: '0 25 * * *'\n"
        "    job_file: missing.jsonl\n"
        "    output: /data/out\n"
        "  - name: hourly\n"
        "    every: 1h\n"
        "    jobs: [{prompt: a fox, adapter: styles/unknown}]\n"
        "    output: /data/out\n"
    )
    (tmp_path / "adapters").mkdir()
    result = subprocess.run(
        [str(OMNI_BATCH), "beat", "--schedule", str(path), "--broker", redis_url,
         "--adapter-root", str(tmp_path / "adapters")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"{path}:3: schedule 'nightly': bad cron expression '0 25 * * *'" in result.stderr
    assert f"{path}:4: schedule 'nightly': job_file missing.jsonl: cannot read" in result.stderr
    assert f"{path}:8: schedule 'hourly': unknown adapter 'styles/unknown'" in result.stderr
    assert redis.Redis.from_url(redis_url).keys("*") == []


def test_a_broker_that_is_not_redis_is_refused(schedule_file: Path) -> None:
    result = subprocess.run(
        [str(OMNI_BATCH), "beat", "--schedule", str(schedule_file), "--broker", "amqp://localhost//"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "beat keeps its schedule state in Redis" in result.stderr


def wait_for_outage(*beats: BeatProcess) -> None:
    """Until every beat has logged that Redis is away; none may exit meanwhile."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not all("Redis is unavailable" in beat.log for beat in beats):
        for beat in beats:
            assert beat.proc.poll() is None, f"beat exited ({beat.proc.returncode}):\n{beat.log}"
        assert time.monotonic() < deadline, "\n".join(beat.log for beat in beats)
        time.sleep(POLL_S)  # polling the logs with a deadline


def test_a_beat_waits_out_a_redis_outage(start_beat, schedule_file: Path, redis_server_factory) -> None:
    server = redis_server_factory(persistent=True)  # as docker-compose runs it: an append-only file
    beat = start_beat(*beat_flags(schedule_file, server.url))
    before = wait_for_runs(server.url, 1, beat)
    server.stop()
    wait_for_outage(beat)
    server.start()
    runs = wait_for_runs(server.url, len(before) + 2, beat)
    assert beat.stop() == 0
    assert all(n == 2 for n in runs.values())


def test_a_beat_carries_on_after_redis_comes_back_empty(
    start_beat, schedule_file: Path, redis_server_factory
) -> None:
    server = redis_server_factory()  # no persistence: a restart loses the lock and the schedule
    beat = start_beat(*beat_flags(schedule_file, server.url))
    wait_for_runs(server.url, 1, beat)
    server.restart()
    runs = wait_for_runs(server.url, 2, beat)  # counted afresh: the queue went with the restart
    assert beat.stop() == 0
    assert all(n == 2 for n in runs.values())
    assert "beat lost its lock" in beat.log


def test_two_beats_carry_on_after_a_redis_outage_without_sending_a_run_twice(
    start_beat, schedule_file: Path, redis_server_factory
) -> None:
    server = redis_server_factory(persistent=True)
    first = start_beat(*beat_flags(schedule_file, server.url))
    before = wait_for_runs(server.url, 1, first)
    second = start_beat(*beat_flags(schedule_file, server.url))
    server.stop()  # the second beat may still be starting, past the CLI's check: it waits too
    wait_for_outage(first, second)
    server.start()
    runs = wait_for_runs(server.url, len(before) + 3, first, second)
    assert first.stop() == 0 and second.stop() == 0
    assert all(n == 2 for n in runs.values())
