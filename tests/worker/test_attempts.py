"""The job start counts in Redis, and what happens when Redis refuses them."""

from __future__ import annotations

import pytest
from fixtures.redis_server import free_port

from worker.attempts import AttemptCounter
from worker.errors import AttemptsUnavailableError


def test_starts_are_counted_until_the_job_finishes(redis_url: str) -> None:
    counter = AttemptCounter(redis_url)
    assert counter.previous(["a", "b"]) == {"a": 0, "b": 0}
    counter.start(["a", "b"])
    counter.start(["a"])
    assert counter.previous(["a", "b"]) == {"a": 2, "b": 1}
    counter.finished(["a"])
    assert counter.previous(["a", "b"]) == {"a": 0, "b": 1}


def test_a_broker_without_redis_keeps_no_counts() -> None:
    counter = AttemptCounter("amqp://localhost//")
    counter.start(["a"])
    assert counter.previous(["a"]) == {"a": 0}


def test_on_rabbitmq_a_redis_result_backend_keeps_the_counts(redis_url: str) -> None:
    counter = AttemptCounter("amqp://localhost//", redis_url)
    counter.start(["a"])
    assert AttemptCounter("amqp://other//", redis_url).previous(["a"]) == {"a": 1}


def test_an_unreachable_redis_is_an_error_not_a_run_without_the_bound() -> None:
    counter = AttemptCounter(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(AttemptsUnavailableError, match="cannot read job start counts"):
        counter.previous(["a"])
    with pytest.raises(AttemptsUnavailableError, match="cannot count job starts"):
        counter.start(["a"])
    counter.finished(["a"])  # a count left behind only makes a later run stricter: logged, not raised
