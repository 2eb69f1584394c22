"""Celery beat for scheduled datasets: RedBeat keeps the schedule in Redis, and each due run is sent as jobs.

RedBeat (celery-redbeat) stores each schedule's last run in Redis and lets one beat at a time tick,
under a lock, so a restarted beat knows what was sent and a second beat waits. On top of that:
- a run is named by the schedule's trigger, not by the moment beat woke: the last scheduled time at
  or before now (`Trigger.latest`). That time becomes the run's dataset and its last-run mark;
- a due run is not a Celery task of its own: this process is a producer, and sends the run's jobs
  (`omni.generate`, as `submit` does) after claiming the run in the ledger (`producer.run_ledger`);
- a run is marked done in RedBeat only once its jobs are all sent, so a failed send is tried again
  at the next tick, and runs missed while no beat was up are coalesced into one, the latest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery
from celery.schedules import BaseSchedule, schedstate
from redbeat.decoder import RedBeatJSONDecoder, RedBeatJSONEncoder
from redbeat.schedulers import (
    RedBeatScheduler,
    RedBeatSchedulerEntry,
    acquire_distributed_beat_lock,
    get_redis,
)
from redis.exceptions import LockError

from producer import defaults as d
from producer.client import Client, celery_config
from producer.errors import BrokerUnavailableError
from producer.routing import describe_queues
from producer.run_ledger import RunLedger, RunRecord, RunState
from producer.schedule_file import Schedule
from producer.settings import read_environment
from producer.triggers import Trigger, trigger_from_dict

log = logging.getLogger(__name__)

# The name beat's entries carry; never sent: a run is sent as its jobs.
SCHEDULED_DATASET_TASK = "omni.scheduled_dataset"
_TRIGGER_TYPE = "omni-trigger"
# RedBeat holds its lock for this many loop intervals, so a beat that dies is replaced that soon.
LOCK_INTERVALS = 5


class _ClaimLapsed(RuntimeError):
    """The run's claim was taken over while it was being sent (this beat stalled past its lease)."""


class DatasetSchedule(BaseSchedule):
    """A trigger as Celery sees a schedule. Due when a scheduled time has passed since the last run's."""

    def __init__(self, trigger: Trigger, nowfun: Any = None, app: Celery | None = None) -> None:
        super().__init__(nowfun=nowfun, app=app)
        self.trigger = trigger

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = self.maybe_make_aware(self.now())
        wait = (self.trigger.next_after(now) - now).total_seconds()
        return schedstate(self.trigger.latest(now) > self.maybe_make_aware(last_run_at), wait)

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        return self.trigger.next_after(self.maybe_make_aware(last_run_at)) - self.maybe_make_aware(self.now())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DatasetSchedule) and other.trigger == self.trigger

    def __hash__(self) -> int:
        return hash(self.trigger)

    def __repr__(self) -> str:
        return f"<{self.trigger.describe()}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return self.__class__, (self.trigger, self.nowfun)


class _Encoder(RedBeatJSONEncoder):
    def default(self, obj: Any) -> Any:
        if isinstance(obj, DatasetSchedule):
            return {"__type__": _TRIGGER_TYPE, **obj.trigger.as_dict()}
        return super().default(obj)


class _Decoder(RedBeatJSONDecoder):
    def dict_to_object(self, d: dict[str, Any]) -> Any:
        if d.get("__type__") == _TRIGGER_TYPE:
            return DatasetSchedule(trigger_from_dict({k: v for k, v in d.items() if k != "__type__"}))
        return super().dict_to_object(d)


class DatasetEntry(RedBeatSchedulerEntry):
    """RedBeat's entry, storing a trigger (RedBeat's JSON knows only Celery's own schedule types)."""

    @staticmethod
    def decode_definition(definition: str) -> dict[str, Any]:
        return json.loads(definition, cls=_Decoder)

    @property
    def due_at(self) -> datetime:
        if self.last_run_at is None:
            return self._default_now()
        return self.schedule.trigger.next_after(self.schedule.maybe_make_aware(self.last_run_at))

    def save(self) -> DatasetEntry:
        # RedBeat's save, with the encoder that knows triggers; the last run is kept if present (HSETNX).
        definition = {
            "name": self.name,
            "task": self.task,
            "args": self.args,
            "kwargs": self.kwargs,
            "options": self.options,
            "schedule": self.schedule,
            "enabled": self.enabled,
        }
        with get_redis(self.app).pipeline() as pipe:
            pipe.hset(self.key, "definition", json.dumps(definition, cls=_Encoder))
            pipe.hsetnx(self.key, "meta", json.dumps({"last_run_at": self.last_run_at}, cls=_Encoder))
            pipe.zadd(self.app.redbeat_conf.schedule_key, {self.key: self.score})
            pipe.execute()
        return self


class DatasetScheduler(RedBeatScheduler):
    """RedBeat's scheduler; a due entry is sent as the jobs of one run of its schedule."""

    Entry = DatasetEntry

    def __init__(self, app: Celery, **kwargs: Any) -> None:
        self.schedules: dict[str, Schedule] = {s.name: s for s in app.omni_schedules}
        self.ledger = RunLedger(get_redis(app))
        self._client: Client | None = None
        self._registered = False  # the schedule is in Redis (setup_schedule went through)
        super().__init__(app, **kwargs)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.app.conf.broker_url)
        return self._client

    def setup_schedule(self) -> None:
        """Put the schedule in Redis. Redis gone between the CLI's check and this (beat starting
        as it goes down) is waited out as any outage, not an exit."""
        try:
            super().setup_schedule()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            self._registered = False
            self._wait_for_redis(e)
        else:
            self._registered = True

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if self.lock is None and self.lock_key:
            return self._lock_again()
        if not self._registered:
            self.setup_schedule()
            if not self._registered:
                return self.max_interval
        try:
            return super().tick(*args, **kwargs)
        except LockError:
            return self._lock_again()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            # Redis down is waited out, tick after tick: nobody else can take the lock meanwhile.
            return self._wait_for_redis(e)

    def _wait_for_redis(self, error: Exception) -> float:
        """Say Redis is away; the seconds until the next try."""
        log.warning("Redis is unavailable (%s); trying again in %g s", error, self.max_interval)
        return self.max_interval

    def _lock_again(self) -> float:
        """The lock lapsed (Redis was away past its timeout, or came back empty), or was never taken
        (no Redis while this beat started): another beat may hold it now. Wait for it as a standby
        beat does, then put the schedule back in Redis."""
        log.warning("beat lost its lock (or never got it); waiting for it, as a standby beat does")
        try:
            if self.lock is None:  # RedBeat's first try, at start, met no Redis (and Celery logged it)
                acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=self))
            else:
                self.lock.acquire()
            # An empty Redis has lost the schedule too: register it again (kept where it survived).
            self.setup_schedule()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            return self._wait_for_redis(e)
        log.info("beat: Acquired lock again")
        return 0.0

    def apply_async(
        self, entry: DatasetEntry, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> None:
        schedule = self.schedules.get(entry.name)
        if schedule is None:  # left in Redis by a beat with another schedules file
            log.warning("schedule %r is not in this beat's schedules file; skipped", entry.name)
            return
        scheduled_at = schedule.trigger.latest(self.app.now())
        dataset = schedule.dataset(scheduled_at)
        record, ours = self.ledger.claim(schedule.name, dataset, scheduled_at)
        if not ours and record.state is RunState.SENDING:
            log.warning("run %s is being sent by another beat; looking again at the next tick", dataset)
            return
        if ours:
            self._send(schedule, record, scheduled_at)
        else:
            log.info(
                "run %s was sent already (%s jobs at %s); not sent again",
                dataset,
                record.jobs,
                record.sent_at,
            )
        # The run's scheduled time is the last run: the next is due at the trigger's next time.
        entry._next_instance(last_run_at=scheduled_at)

    def _send(self, schedule: Schedule, record: RunRecord, scheduled_at: datetime) -> None:
        jobs = schedule.jobs(scheduled_at)

        def still_ours(_: int) -> None:
            # Each chunk the broker takes renews the run's claim and beat's own lock.
            if not self.ledger.renew(record):
                raise _ClaimLapsed(f"the claim on run {record.dataset} lapsed while it was being sent")
            if self.lock is not None:
                self.lock.extend(int(self.lock_timeout))

        try:
            self.client.submit_many(jobs, progress=still_ours)
        except (BrokerUnavailableError, _ClaimLapsed):
            self.ledger.release(record)
            raise
        period = (schedule.trigger.next_after(scheduled_at) - scheduled_at).total_seconds()
        self.ledger.mark_sent(record, jobs=len(jobs), keep_s=2 * period)
        where = describe_queues(self.client.sent_to)
        log.info("sent run %s: %d jobs to %s", record.dataset, len(jobs), where)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        super().close()


def make_beat_app(schedules: Sequence[Schedule], *, broker_url: str, max_interval: float) -> Celery:
    """The Celery app `omni-batch beat` runs: the producer's wire settings, RedBeat in the broker's Redis."""
    app = Celery("omni-beat")
    app.conf.update(celery_config(broker_url, task_events=read_environment().task_events))
    app.conf.update(
        beat_scheduler=f"{__name__}:DatasetScheduler",
        beat_schedule={
            s.name: {"task": SCHEDULED_DATASET_TASK, "schedule": DatasetSchedule(s.trigger)}
            for s in schedules
        },
        beat_max_loop_interval=max_interval,
        redbeat_redis_url=broker_url,
        redbeat_redis_options={},
        redbeat_key_prefix=d.BEAT_KEY_PREFIX,
        redbeat_lock_key=d.BEAT_LOCK_KEY,
        redbeat_lock_timeout=max(1, round(LOCK_INTERVALS * max_interval)),
        # No result backend: keep beat from scheduling Celery's own result clean-up task.
        result_expires=None,
    )
    app.omni_schedules = list(schedules)
    return app
