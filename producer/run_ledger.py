"""The record of scheduled runs in Redis: a claim on each run before it is sent, and each schedule's last run.

A run is named by its dataset (the schedule's name and the run's scheduled time), so every beat
claims a run under the same key. The claim is taken with SET NX before any job is sent: a second
beat, or the same beat restarted, that finds a run `sent` skips it, and one that finds it `sending`
waits. A `sending` claim is a lease that the sender renews as the broker takes its chunks; a beat
killed mid-send lets it lapse, and the run is then sent again whole (its job ids repeat, so workers
skip what is done and drop what they already hold).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum

import redis

from producer.defaults import LAST_RUN_KEY_PREFIX, SCHEDULED_RUN_KEY_PREFIX

# A sender that stops renewing (killed, wedged) gives the run up after this long.
CLAIM_LEASE_S = 30.0
# How long a sent run's record is kept: long enough to cover any restart within its schedule period.
MIN_KEEP_S = 24 * 3600

# Renew or delete the claim only while it is still this sender's (its token is in the value).
_IF_OURS = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == 'delete' then return redis.call('del', KEYS[1]) end
return redis.call('pexpire', KEYS[1], ARGV[2])
"""


class RunState(StrEnum):
    SENDING = "sending"
    SENT = "sent"


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One scheduled run: which schedule, its dataset and scheduled time, how far it got."""

    schedule: str
    dataset: str
    scheduled_at: str  # ISO 8601, UTC
    state: RunState = RunState.SENDING
    jobs: int | None = None
    sent_at: str | None = None
    token: str = ""  # who holds a `sending` claim

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, raw: str | bytes) -> RunRecord:
        data = json.loads(raw)
        return cls(**{**data, "state": RunState(data["state"])})


def run_key(dataset: str) -> str:
    return SCHEDULED_RUN_KEY_PREFIX + dataset


def last_run_key(schedule: str) -> str:
    return LAST_RUN_KEY_PREFIX + schedule


class RunLedger:
    """Claims and records of scheduled runs, in the Redis that holds beat's schedule."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._if_ours = client.register_script(_IF_OURS)

    def claim(self, schedule: str, dataset: str, scheduled_at: datetime) -> tuple[RunRecord, bool]:
        """Claim the run: (our new record, True), or (the record someone else holds, False)."""
        record = RunRecord(
            schedule=schedule,
            dataset=dataset,
            scheduled_at=scheduled_at.astimezone(UTC).isoformat(),
            token=uuid.uuid4().hex,
        )
        if self.client.set(run_key(dataset), record.encode(), nx=True, px=int(CLAIM_LEASE_S * 1000)):
            return record, True
        held = self.client.get(run_key(dataset))
        if held is None:  # it lapsed between the two calls: try once more
            return self.claim(schedule, dataset, scheduled_at)
        return RunRecord.decode(held), False

    def renew(self, record: RunRecord) -> bool:
        """Extend our lease; False when the claim is no longer ours."""
        return bool(
            self._if_ours(keys=[run_key(record.dataset)], args=[record.encode(), int(CLAIM_LEASE_S * 1000)])
        )

    def release(self, record: RunRecord) -> None:
        """Give the claim up (the send failed), so the run can be sent again."""
        self._if_ours(keys=[run_key(record.dataset)], args=[record.encode(), "delete"])

    def mark_sent(self, record: RunRecord, *, jobs: int, keep_s: float) -> RunRecord:
        """Record the run as sent (kept `keep_s`, at least a day) and as its schedule's last run."""
        sent = replace(
            record, state=RunState.SENT, jobs=jobs, sent_at=datetime.now(UTC).isoformat(), token=""
        )
        with self.client.pipeline() as pipe:
            pipe.set(run_key(record.dataset), sent.encode(), ex=int(max(keep_s, MIN_KEEP_S)))
            pipe.set(last_run_key(record.schedule), sent.encode())
            pipe.execute()
        return sent

    def last_run(self, schedule: str) -> RunRecord | None:
        raw = self.client.get(last_run_key(schedule))
        return RunRecord.decode(raw) if raw is not None else None
