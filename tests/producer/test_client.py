"""The client against a real, private redis-server: what lands in the queue, and broker failures."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis
from celery import Celery
from fixtures.redis_server import RedisServer, free_port, queued_messages

from producer import defaults, settings
from producer.broker import BrokerKind, broker_priority
from producer.client import Client, celery_config
from producer.errors import BrokerUnavailableError, ProducerError, SettingsError
from producer.schema import Job
from worker.redis_transport import priority_list_key


@pytest.fixture(autouse=True)
def _no_broker_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.ENV_BROKER_URL, raising=False)


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(redis_url) as c:
        yield c


def queued(redis_url: str) -> list[dict]:
    return queued_messages(redis.Redis.from_url(redis_url), defaults.QUEUE)


def test_submit_sends_omni_generate_by_name_as_json(client: Client, redis_url: str) -> None:
    job = Job(prompt="a cat", adapter="styles/ink", width=64, height=64, metadata={"k": [1]})
    before = time.time()
    assert client.submit(job) == job.job_id
    after = time.time()

    (message,) = queued(redis_url)
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "omni.generate"
    assert message["headers"]["id"] == job.job_id
    args, kwargs, _embed = message["decoded_body"]
    assert args == [job.wire_dict()]
    assert kwargs == {}
    assert before <= message["headers"]["omni_submitted_at"] <= after
    assert message["headers"]["ignore_result"] is True
    assert message["properties"]["delivery_info"]["routing_key"] == "omni"


def test_a_dataset_is_queued_with_each_adapters_jobs_together(client: Client, redis_url: str) -> None:
    """A file that cycles through adapters reaches the queue as one run per adapter (its batch keys
    together), each where its first job was, within each priority: a window meets long runs."""
    jobs = [
        Job(prompt=f"p{i}", adapter=adapter, width=width, priority=priority)
        for i, (adapter, width, priority) in enumerate(
            [
                *[("a", 64, 5), ("b", 64, 5), (None, 64, 5), ("a", 64, 5), ("b", 64, 5), ("a", 32, 5)],
                *[("b", 64, 9), ("a", 64, 9), ("b", 64, 9), ("a", 64, 5), (None, 64, 5)],
            ]
        )
    ]

    assert client.submit_many(jobs) == [job.job_id for job in jobs], "ids in the order given"

    taken = [m["decoded_body"][0][0] for m in queued(redis_url)]
    runs = [(j["priority"], j["adapter"], j["width"]) for j in taken]
    assert runs == [
        (9, "b", 64), (9, "b", 64), (9, "a", 64),
        (5, "a", 64), (5, "a", 64), (5, "a", 64), (5, "a", 32), (5, "b", 64), (5, "b", 64),
        (5, None, 64), (5, None, 64),
    ]  # fmt: skip
    assert sorted(j["prompt"] for j in taken) == sorted(job.prompt for job in jobs)


def test_job_priority_maps_to_kombus_reversed_order(client: Client, redis_url: str) -> None:
    client.submit_many([Job(prompt=f"p{p}", priority=p) for p in range(10)])
    by_key = {m["key"]: m["decoded_body"][0][0]["priority"] for m in queued(redis_url)}
    assert by_key[priority_list_key("omni", 0)] == 9  # the list kombu serves first
    assert by_key[priority_list_key("omni", 9)] == 0
    assert len(by_key) == 10
    assert [broker_priority(p, BrokerKind.REDIS) for p in (9, 5, 0)] == [0, 4, 9]
    # RabbitMQ's real priorities serve the highest number first: a job's own.
    assert [broker_priority(p, BrokerKind.AMQP) for p in (9, 5, 0)] == [9, 5, 0]


def test_a_consumer_with_the_shared_config_takes_urgent_jobs_first(broker) -> None:
    priorities = [5, 0, 8, 9, 5, 3, 9, 7, 6, 4]  # 8 before 9: kombu's default 4 buckets would mix them
    jobs = [Job(prompt=f"job {i}", priority=p) for i, p in enumerate(priorities)]
    with Client(broker.url) as client:
        client.submit_many(jobs)

    # Read back the way a worker does: a Celery app built from the same config.
    app = Celery("reader", set_as_current=False)
    app.conf.update(celery_config(broker.url))
    taken = []
    with app.connection_for_read() as connection:
        queue = app.amqp.queues[defaults.QUEUE](connection.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            taken.append(message.decode()[0][0]["prompt"])
    app.close()
    expected = [job.prompt for job in sorted(jobs, key=lambda j: -j.priority)]  # stable: FIFO within one
    assert taken == expected


def test_submit_many_returns_ids_in_order_and_reports_progress(client: Client, redis_url: str) -> None:
    jobs = [Job(prompt=f"prompt {i}", dataset=f"ds{i % 3}") for i in range(1203)]
    seen: list[int] = []
    assert client.submit_many(jobs, progress=seen.append) == [job.job_id for job in jobs]
    assert sum(seen) == len(jobs)
    assert len(seen) > 1  # chunks, so a progress bar moves
    assert [m["headers"]["id"] for m in queued(redis_url)] == [job.job_id for job in jobs]


def test_submit_many_uses_one_connection_for_the_batch(client: Client, redis_url: str) -> None:
    probe = redis.Redis.from_url(redis_url)
    client.submit(Job(prompt="warm up"))
    before = probe.info("stats")["total_connections_received"]
    client.submit_many([Job(prompt=f"p{i}") for i in range(1500)])
    assert probe.info("stats")["total_connections_received"] - before <= 2


def test_same_job_twice_is_sent_with_the_same_task_id(client: Client, redis_url: str) -> None:
    client.submit(Job(prompt="a cat"))
    client.submit(Job(prompt="a cat"))
    first, second = queued(redis_url)
    assert first["headers"]["id"] == second["headers"]["id"] == Job(prompt="a cat").job_id


def test_broker_url_comes_from_the_environment_and_the_argument_wins(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(settings.ENV_BROKER_URL, redis_url)
    with Client() as c:
        c.submit(Job(prompt="from env"))
    assert len(queued(redis_url)) == 1

    monkeypatch.setenv(settings.ENV_BROKER_URL, f"redis://127.0.0.1:{free_port()}/0")
    with Client(redis_url) as c:
        c.submit(Job(prompt="from argument"))
    assert len(queued(redis_url)) == 2


def test_default_broker_url_is_local_redis() -> None:
    assert Client().broker_url == "redis://localhost:6379/0"


def test_unreachable_broker_raises_a_clear_error_without_the_password() -> None:
    port = free_port()
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    with Client(url) as c, pytest.raises(BrokerUnavailableError) as info:
        c.submit_many([Job(prompt="a"), Job(prompt="b")])
    message = str(info.value)
    assert isinstance(info.value, ProducerError)
    assert "hunter2" not in message and "hunter2" not in repr(c)
    assert f"broker redis://***@127.0.0.1:{port}/0 is unavailable" in message
    assert "nothing was sent" in message
    assert info.value.sent == 0


def test_wrong_password_is_a_broker_error(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory(password="right-one")
    with (
        Client(server.url.replace("right-one", "wrong-one")) as c,
        pytest.raises(BrokerUnavailableError) as info,
    ):
        c.submit(Job(prompt="a"))
    assert "wrong-one" not in str(info.value)
    assert server.client().keys() == []


def test_password_protected_broker_works(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory(password="s3cret")
    with Client(server.url) as c:
        c.submit(Job(prompt="a"))
    assert len(queued_messages(server.client(), "omni")) == 1


def test_broker_that_dies_between_batches_raises_the_clear_error(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    with Client(server.url) as c:
        c.submit(Job(prompt="a"))  # the pooled connection is now open
        server.kill()
        with pytest.raises(BrokerUnavailableError) as info:
            c.submit_many([Job(prompt=f"p{i}") for i in range(10)])
    assert server.url in str(info.value)
    # The pipelined chunk failed on the wire: its fate is unknown, and the error says so.
    assert (info.value.sent, info.value.uncertain, info.value.total) == (0, 10, 10)
    assert "up to 10 more may have been" in str(info.value)


def test_an_error_in_the_progress_callback_is_not_a_broker_error(client: Client) -> None:
    def progress(_: int) -> None:
        raise BrokenPipeError("stderr went away")

    with pytest.raises(BrokenPipeError):
        client.submit_many([Job(prompt="a")], progress=progress)


def test_client_survives_a_broker_restart(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory()
    with Client(server.url) as c:
        c.submit(Job(prompt="a"))
        server.restart()
        c.submit(Job(prompt="b"))
    assert [m["decoded_body"][0][0]["prompt"] for m in queued_messages(server.client(), "omni")] == ["b"]


def test_celery_config_is_json_only_with_ten_strict_priority_lists() -> None:
    config = celery_config("redis://h/0", "redis://h/1")
    assert config["broker_url"] == "redis://h/0"
    assert config["result_backend"] == "redis://h/1"
    assert config["task_serializer"] == "json"
    assert config["accept_content"] == ["json"]
    assert config["result_accept_content"] == ["json"]
    assert config["task_default_queue"] == "omni"
    options = config["broker_transport_options"]
    assert options["priority_steps"] == list(range(10))
    assert options["queue_order_strategy"] == "priority"


def test_celery_config_hands_out_fresh_copies() -> None:
    # kombu updates transport options in place; one app must not change another's.
    first = celery_config("redis://h/0")
    first["broker_transport_options"]["priority_steps"].append(10)
    first["broker_transport_options"]["max_retries"] = 1
    second = celery_config("redis://h/0")["broker_transport_options"]
    assert second["priority_steps"] == list(range(10))
    assert "max_retries" not in second
    with pytest.raises(TypeError):
        defaults.BROKER_TRANSPORT_OPTIONS["x"] = 1  # type: ignore[index]


@pytest.mark.parametrize("url", ["sqs://key@queue", "memory://", "localhost:6379", ""])
def test_a_broker_other_than_redis_or_rabbitmq_is_refused_by_name(url: str) -> None:
    with pytest.raises(SettingsError, match="neither Redis nor RabbitMQ"):
        Client(url or "nothing://")
    with pytest.raises(SettingsError, match="neither Redis nor RabbitMQ"):
        celery_config(url)


def test_a_refused_broker_url_never_shows_its_password() -> None:
    with pytest.raises(SettingsError) as error:
        Client("kafka://user:s3cret@host:9092")
    assert "s3cret" not in str(error.value)
