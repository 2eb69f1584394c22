"""The records beside each image: written as plain JSON, read back by `status`."""

from __future__ import annotations

import json

from producer.records import JobStatus, encode, error_record, failure_reason
from producer.schema import validate_job


def test_an_error_record_holds_the_job_and_a_readable_reason() -> None:
    job = validate_job({"prompt": "a cat", "adapter": "styles/x"})
    record = json.loads(encode(error_record(job, ValueError("bad scale"))))
    assert record["status"] == "failed" == JobStatus.FAILED
    assert record["job"] == job.wire_dict()
    assert failure_reason(encode(record)) == "ValueError: bad scale"


def test_a_refused_message_is_recorded_as_it_came() -> None:
    record = error_record({"prompt": 3}, ValueError("not a job"))
    assert record["job"] == {"prompt": 3}


def test_an_unreadable_record_has_no_reason() -> None:
    assert failure_reason(None) is None
    assert failure_reason(b"{not json") is None
    assert failure_reason(json.dumps({"status": "failed"}).encode()) is None


def test_statuses_serialise_as_plain_strings() -> None:
    assert json.dumps({"status": JobStatus.OK}) == '{"status": "ok"}'
