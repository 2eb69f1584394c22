"""Triggers: which run a moment belongs to, and when the next one fires, with a clock the test sets."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from producer.triggers import CronTrigger, EveryTrigger, trigger_from_dict


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_cron_reads_its_expression_in_its_time_zone() -> None:
    paris = CronTrigger("0 14 * * *", "Europe/Paris")  # 14:00 in Paris is 13:00 UTC in winter
    assert paris.latest(utc(2026, 11, 29, 13, 0, 0)) == utc(2026, 11, 29, 13, 0)  # at the firing itself
    assert paris.latest(utc(2026, 11, 29, 12, 59, 59)) == utc(2026, 11, 28, 13, 0)
    assert paris.next_after(utc(2026, 11, 29, 13, 0, 0)) == utc(2026, 11, 30, 13, 0)
    assert paris.stamp(paris.latest(utc(2026, 11, 29, 20))) == "20261129T1300Z"
    summer = paris.latest(utc(2026, 7, 1, 12, 30))
    assert summer == utc(2026, 7, 1, 12, 0)  # 14:00 CEST


def test_cron_on_a_daylight_saving_day_fires_once() -> None:
    # 02:30 does not exist in Paris on 2026-03-29: Debian cron runs it at 03:00 CEST (01:00 UTC).
    trigger = CronTrigger("30 2 * * *", "Europe/Paris")
    assert trigger.next_after(utc(2026, 3, 28, 12)) == utc(2026, 3, 29, 1, 0)
    # 02:30 happens twice on 2026-10-25: one run, not two.
    first = trigger.next_after(utc(2026, 10, 24, 12))
    assert trigger.next_after(first) == first.replace(day=26, hour=1)


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("61 * * * *", "Bad minute"),
        ("0 25 * * *", "Bad hour"),
        ("0 0 31 2 *", "Bad day-of-month"),
        ("* * *", "five fields"),
        ("*/5 * * * * *", "five fields"),
    ],
)
def test_a_bad_cron_expression_is_refused_with_the_reason(expression: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        CronTrigger(expression)


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Europe/Pariss'"):
        CronTrigger("* * * * *", "Europe/Pariss")


def test_every_is_aligned_to_the_epoch_so_every_beat_names_a_run_alike() -> None:
    five = EveryTrigger.parse("5s")
    assert five.latest(utc(2026, 11, 29, 13, 0, 7)) == utc(2026, 11, 29, 13, 0, 5)
    assert five.next_after(utc(2026, 11, 29, 13, 0, 5)) == utc(2026, 11, 29, 13, 0, 10)
    assert five.stamp(utc(2026, 11, 29, 13, 0, 5)) == "20261129T130005Z"
    hourly = EveryTrigger.parse("1h")
    assert hourly.latest(utc(2026, 11, 29, 13, 59, 59)) == utc(2026, 11, 29, 13)
    assert hourly.stamp(utc(2026, 11, 29, 13)) == "20261129T1300Z"
    assert [EveryTrigger.parse(t).describe() for t in ("90m", "120m", "86400s")] == [
        "every 90m",
        "every 2h",
        "every 1d",
    ]


@pytest.mark.parametrize("text", ["5", "5x", "0s", "-5s", "1.5h", "5 s s"])
def test_a_bad_interval_is_refused_with_the_form_to_use(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 30s, 5m, 2h or 1d"):
        EveryTrigger.parse(text)


def test_a_trigger_survives_its_dict_form() -> None:
    for trigger in (CronTrigger("0 2 * * 1-5", "Asia/Tokyo"), EveryTrigger.parse("90m")):
        assert trigger_from_dict(trigger.as_dict()) == trigger


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        EveryTrigger(5).latest(datetime(2026, 1, 1))
