"""How many times each job was started without finishing, kept in Redis: the broker's, or on
RabbitMQ (which has nowhere to keep them) the result backend's.

A job that kills the worker process is redelivered, and would kill every worker forever. Each
start is counted before the engine runs and forgotten once the job's outcome is stored, so a
count left over means earlier runs died; at the limit the job is failed, not run again.

When Redis refuses to read or count starts, the bound cannot be kept, so nothing runs unbounded:
AttemptsUnavailableError is raised and the worker puts the jobs back in the queue. A count that
cannot be cleared is left (and expires): it can only make a later run of that job stricter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis

from producer.defaults import ATTEMPTS_KEY_PREFIX
from worker.errors import AttemptsUnavailableError

logger = logging.getLogger("omni.worker")

# Counts outlive any redelivery delay (the visibility timeout) but not forever.
ATTEMPTS_TTL_S = 7 * 24 * 3600


def _is_redis(url: str | None) -> bool:
    return url is not None and url.startswith(("redis://", "rediss://"))


class AttemptCounter:
    """Start counts per job id, in the broker's Redis, else the result backend's; with neither,
    none is kept and the poison bound does not hold (said once, at start)."""

    def __init__(self, broker_url: str, result_backend: str | None = None) -> None:
        store = next((url for url in (broker_url, result_backend) if _is_redis(url)), None)
        self._redis = redis.Redis.from_url(store) if store is not None else None
        if store is None:
            logger.warning(
                "job starts are not counted, so a job that kills the worker is redelivered without "
                "bound: with this broker, set a Redis result backend to keep the counts in"
            )

    def previous(self, job_ids: Iterable[str]) -> dict[str, int]:
        """How many times each job was started before and did not finish."""
        job_ids = list(job_ids)
        if self._redis is None or not job_ids:
            return dict.fromkeys(job_ids, 0)
        try:
            counts = self._redis.mget([ATTEMPTS_KEY_PREFIX + job_id for job_id in job_ids])
        except redis.RedisError as e:
            raise AttemptsUnavailableError(f"cannot read job start counts from Redis: {e}") from e
        return {job_id: int(count or 0) for job_id, count in zip(job_ids, counts, strict=True)}

    def start(self, job_ids: Iterable[str]) -> None:
        """Count one more start of each job, just before the engine runs it."""
        job_ids = list(job_ids)
        if self._redis is None or not job_ids:
            return
        try:
            pipe = self._redis.pipeline()
            for job_id in job_ids:
                pipe.incr(ATTEMPTS_KEY_PREFIX + job_id)
                pipe.expire(ATTEMPTS_KEY_PREFIX + job_id, ATTEMPTS_TTL_S)
            pipe.execute()
        except redis.RedisError as e:
            raise AttemptsUnavailableError(f"cannot count job starts in Redis: {e}") from e

    def finished(self, job_ids: Iterable[str]) -> None:
        """Forget the counts of jobs whose outcome is stored."""
        job_ids = list(job_ids)
        if self._redis is None or not job_ids:
            return
        try:
            self._redis.delete(*(ATTEMPTS_KEY_PREFIX + job_id for job_id in job_ids))
        except redis.RedisError as e:
            logger.error("cannot clear job start counts (%s); they expire in %d s", e, ATTEMPTS_TTL_S)
