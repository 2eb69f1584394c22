"""The fault tests' diagnosis of an unsettled job: LATE while the broker still has it, LOST when
no queue does, on each broker."""

from __future__ import annotations

from fixtures.lost_or_late import describe_missing

from producer.client import Client
from producer.schema import validate_job
from producer.storage import open_storage


def test_a_queued_job_is_late_and_one_the_broker_lacks_is_lost(broker, tmp_path):
    queued = [validate_job({"prompt": f"waiting {i}", "dataset": "d"}) for i in range(2)]
    with Client(broker.url) as client:
        client.submit_many(queued)
    never_sent = validate_job({"prompt": "never sent", "dataset": "d"})
    storage = open_storage(str(tmp_path))

    both = describe_missing(storage, "d", [j.job_id for j in queued], broker.url)
    assert "LATE" in both and "LOST" not in both, both
    three = describe_missing(storage, "d", [j.job_id for j in [*queued, never_sent]], broker.url)
    if broker.kind == "redis":  # Redis lists every message: the verdict names the job
        assert f"{never_sent.job_id}: LOST" in three, three
        assert all(f"{j.job_id}: LATE" in three for j in queued), three
    else:  # RabbitMQ hands out no ids without consuming: the verdict is on the count
        assert "LOST: at least 1 in no queue" in three, three


def test_a_broker_that_is_down_is_reported_as_not_inspected(restartable_broker, tmp_path):
    job = validate_job({"prompt": "waiting", "dataset": "d"})
    with Client(restartable_broker.url) as client:
        client.submit_many([job])
    storage = open_storage(str(tmp_path))
    assert "LATE" in describe_missing(storage, "d", [job.job_id], restartable_broker.url)

    restartable_broker.kill()
    down = describe_missing(storage, "d", [job.job_id], restartable_broker.url)
    assert down.startswith("the broker could not be inspected") and "LOST or LATE unknown" in down, down
