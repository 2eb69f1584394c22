"""When a schedule fires: a cron expression in a time zone, or a fixed interval (`every: 5s`).

A trigger maps any moment to the scheduled time of the run it belongs to (`latest`), so every beat,
before or after a restart, names a run the same way: the run's dataset is built from that time,
never from the moment a beat happened to wake up. Times are timezone-aware; runs are named in UTC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

DEFAULT_TIMEZONE = "UTC"
_EVERY_RE = re.compile(r"([1-9][0-9]*)\s*([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MINUTE_STAMP = "%Y%m%dT%H%MZ"
_SECOND_STAMP = "%Y%m%dT%H%M%SZ"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no time zone: triggers compare aware times only")
    return moment


def time_zone(name: str) -> ZoneInfo:
    """The IANA zone `name` (e.g. Europe/Paris); ValueError naming it when there is no such zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'Europe/Paris' or 'UTC')") from e


@dataclass(frozen=True)
class CronTrigger:
    """A standard five-field cron expression, read in `timezone` (daylight saving as Debian cron does)."""

    expression: str
    timezone: str = DEFAULT_TIMEZONE

    def __post_init__(self) -> None:
        zone = time_zone(self.timezone)
        if len(self.expression.split()) != 5:
            raise ValueError(
                f"cron expression {self.expression!r} must have five fields: "
                "minute hour day-of-month month day-of-week"
            )
        try:
            next(CronSim(self.expression, datetime.now(zone)))
        except (CronSimError, ValueError, StopIteration) as e:
            raise ValueError(f"bad cron expression {self.expression!r}: {e or 'it never fires'}") from None

    def latest(self, now: datetime) -> datetime:
        """The scheduled time of the run `now` belongs to: the last firing at or before `now`."""
        local = _aware(now).astimezone(ZoneInfo(self.timezone)).replace(microsecond=0)
        # cronsim's reverse iteration starts strictly before the moment it is given.
        return next(CronSim(self.expression, local + timedelta(seconds=1), reverse=True)).astimezone(UTC)

    def next_after(self, moment: datetime) -> datetime:
        """The first firing strictly after `moment`."""
        local = _aware(moment).astimezone(ZoneInfo(self.timezone))
        return next(CronSim(self.expression, local)).astimezone(UTC)

    def stamp(self, scheduled_at: datetime) -> str:
        """The run's time as it appears in its dataset name, e.g. `20261129T1400Z` (UTC)."""
        return scheduled_at.astimezone(UTC).strftime(_MINUTE_STAMP)

    def describe(self) -> str:
        return f"cron '{self.expression}' ({self.timezone})"

    def as_dict(self) -> dict[str, str]:
        return {"cron": self.expression, "timezone": self.timezone}


@dataclass(frozen=True)
class EveryTrigger:
    """A fixed interval aligned to the Unix epoch (UTC): `every: 1h` fires on the hour, `5s` at :00, :05."""

    seconds: int

    def __post_init__(self) -> None:
        if self.seconds < 1:
            raise ValueError(f"an interval must be at least one second, not {self.seconds}")

    @classmethod
    def parse(cls, text: str) -> EveryTrigger:
        """`30s`, `5m`, `2h` or `1d`; ValueError saying the form otherwise."""
        match = _EVERY_RE.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"bad interval {text!r}: write a whole number and a unit, e.g. 30s, 5m, 2h or 1d"
            )
        return cls(int(match.group(1)) * _UNIT_SECONDS[match.group(2)])

    def latest(self, now: datetime) -> datetime:
        """The scheduled time of the run `now` belongs to: the last multiple of the interval."""
        elapsed = int((_aware(now) - _EPOCH).total_seconds())
        return _EPOCH + timedelta(seconds=elapsed - elapsed % self.seconds)

    def next_after(self, moment: datetime) -> datetime:
        """The first firing strictly after `moment`."""
        return self.latest(moment) + timedelta(seconds=self.seconds)

    def stamp(self, scheduled_at: datetime) -> str:
        """The run's time in its dataset name: to the second only for intervals that are not whole minutes."""
        form = _MINUTE_STAMP if self.seconds % 60 == 0 else _SECOND_STAMP
        return scheduled_at.astimezone(UTC).strftime(form)

    def describe(self) -> str:
        for unit, size in sorted(_UNIT_SECONDS.items(), key=lambda item: -item[1]):
            if self.seconds % size == 0:
                return f"every {self.seconds // size}{unit}"
        raise AssertionError("every interval is a whole number of seconds")

    def as_dict(self) -> dict[str, str]:
        return {"every": self.describe().removeprefix("every ")}


Trigger = CronTrigger | EveryTrigger


def trigger_from_dict(data: dict[str, str]) -> Trigger:
    """The inverse of `as_dict`, for a trigger stored in Redis."""
    if "every" in data:
        return EveryTrigger.parse(data["every"])
    return CronTrigger(data["cron"], data.get("timezone", DEFAULT_TIMEZONE))
