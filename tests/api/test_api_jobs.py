"""`omni-batch serve` without a worker: jobs in, checked as `submit` checks them, on a real Redis.

Each test runs a real uvicorn process (`omni-batch serve`) and talks HTTP to it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import redis
import requests
from fixtures.api_server import TOKEN
from fixtures.command_process import OMNI_BATCH
from fixtures.redis_server import free_port, queued_messages

from producer.schema import validate_job

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def queued(redis_url: str) -> list[dict]:
    return [m["decoded_body"][0][0] for m in queued_messages(redis.Redis.from_url(redis_url), "omni")]


@pytest.fixture
def api(start_api, redis_url: str, tmp_path: Path):
    return start_api("--broker", redis_url, "--out", str(tmp_path / "out"), "--max-jobs", "5", tokens=TOKEN)


def test_a_posted_job_is_enqueued_exactly_as_submit_would_send_it(api, redis_url: str) -> None:
    job = {"prompt": "a lighthouse", "dataset": "coast", "adapter": "styles/ink", "scale": 0.5}
    answer = requests.post(f"{api.url}/v1/jobs", json=job, headers=AUTH, timeout=30)

    assert answer.status_code == 202, answer.text
    expected = validate_job(job)
    (ref,) = answer.json()["jobs"]
    assert ref["job_id"] == expected.job_id and ref["dataset"] == "coast"
    assert queued(redis_url) == [expected.wire_dict()]
    status = requests.get(ref["status_url"], headers=AUTH, timeout=30)
    assert status.status_code == 200
    assert status.json() == {"job_id": expected.job_id, "dataset": "coast", "status": "queued"}


def test_a_list_is_enqueued_in_order_and_identical_repeats_once(api, redis_url: str) -> None:
    jobs = [{"prompt": f"picture {i}", "priority": 5} for i in range(3)]
    answer = requests.post(f"{api.url}/v1/jobs", json=[*jobs, jobs[0]], headers=AUTH, timeout=30)

    assert answer.status_code == 202, answer.text
    assert answer.json()["duplicates"] == 1
    assert [j["job_id"] for j in answer.json()["jobs"]] == [validate_job(j).job_id for j in jobs]
    assert [j["prompt"] for j in queued(redis_url)] == ["picture 0", "picture 1", "picture 2"]


def test_a_bad_list_is_refused_whole_with_every_problem_and_nothing_is_enqueued(api, redis_url: str) -> None:
    jobs = [
        {"prompt": "fine"},
        {"prompt": "too strong", "scale": 9.0},
        {"dataset": "no-prompt"},
        {"prompt": "a", "job_id": "same"},
        {"prompt": "b", "job_id": "same"},
        {"prompt": "typo", "sclae": 1.0},
    ]
    answer = requests.post(f"{api.url}/v1/jobs", json=jobs[:5], headers=AUTH, timeout=30)

    assert answer.status_code == 422
    problems = answer.json()["error"]["problems"]
    assert any(p.startswith("jobs[1]: scale = 9.0") for p in problems), problems
    assert "jobs[2]: prompt: required field is missing" in problems
    assert any(p.startswith("jobs[4]: job_id = 'same': jobs[3] has a different job") for p in problems)
    assert len(problems) == 3
    assert queued(redis_url) == []

    unknown_field = requests.post(f"{api.url}/v1/jobs", json=jobs[5], headers=AUTH, timeout=30)
    assert unknown_field.status_code == 422
    assert unknown_field.json()["error"]["problems"][0].startswith("job: sclae: unknown field")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"prompt": "a",', 400, "the body is not valid JSON"),
        (b"[]", 422, "a non-empty list of jobs"),
        (b'"a job"', 422, "one job (a JSON object)"),
        (b'{"prompt": "nan", "scale": NaN}', 422, "scale"),
        (json.dumps([{"prompt": str(i)} for i in range(6)]).encode(), 413, "limit of 5 jobs"),
    ],
)
def test_bodies_that_are_no_jobs_are_refused_clearly(
    api, redis_url: str, body: bytes, status: int, message: str
) -> None:
    answer = requests.post(
        f"{api.url}/v1/jobs", data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=30
    )
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]["message"]
    assert queued(redis_url) == []


def test_a_job_for_another_output_is_refused(api, redis_url: str) -> None:
    answer = requests.post(
        f"{api.url}/v1/jobs", json={"prompt": "a", "output": "s3://elsewhere/out"}, headers=AUTH, timeout=30
    )
    assert answer.status_code == 422
    assert "its own output only" in answer.json()["error"]["problems"][0]
    assert queued(redis_url) == []


def test_without_the_token_nothing_is_served_and_the_token_is_never_echoed(api, redis_url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        answer = requests.post(f"{api.url}/v1/jobs", json={"prompt": "a"}, headers=headers, timeout=30)
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert answer.json()["error"]["type"] == "authentication_error"
        assert requests.get(f"{api.url}/v1/datasets/default", headers=headers, timeout=30).status_code == 401
    assert queued(redis_url) == []
    assert TOKEN not in api.log
    # The document and the liveness check are public.
    assert requests.get(f"{api.url}/openapi.json", timeout=30).status_code == 200


def test_bodies_over_the_byte_limit_are_refused_declared_or_streamed(start_api, redis_url, tmp_path) -> None:
    api = start_api("--broker", redis_url, "--out", str(tmp_path / "out"), "--max-body-bytes", "1000")
    big = json.dumps({"prompt": "x" * 1500}).encode()
    declared = requests.post(f"{api.url}/v1/jobs", data=big, timeout=30)
    streamed = requests.post(f"{api.url}/v1/jobs", data=iter([big[:600], big[600:]]), timeout=30)

    for answer in (declared, streamed):
        assert answer.status_code == 413
        assert "limit of 1000 bytes" in answer.json()["error"]["message"]
    assert queued(redis_url) == []
    small = requests.post(f"{api.url}/v1/jobs", json={"prompt": "x"}, timeout=30)
    assert small.status_code == 202  # no token configured: loopback without auth


def test_an_unreachable_broker_is_503_with_its_password_masked(start_api, tmp_path: Path) -> None:
    broker = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    api = start_api("--broker", broker, "--out", str(tmp_path / "out"))
    answer = requests.post(f"{api.url}/v1/jobs", json={"prompt": "a"}, timeout=60)

    assert answer.status_code == 503
    assert "is unavailable" in answer.json()["error"]["message"]
    assert "hunter2" not in answer.text and "hunter2" not in api.log


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(OMNI_BATCH), "serve", "--host", "0.0.0.0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "refusing to listen on '0.0.0.0' with no API token" in result.stderr


def test_status_and_counts_name_bad_path_parameters(api) -> None:
    for path in ("/v1/jobs/ok/x.error", "/v1/datasets/%2E%2E", "/v1/jobs/a%20b/x"):
        answer = requests.get(f"{api.url}{path}", headers=AUTH, timeout=30)
        assert answer.status_code == 422, (path, answer.text)
        assert answer.json()["error"]["problems"]
    counts = requests.get(f"{api.url}/v1/datasets/empty", headers=AUTH, timeout=30)
    assert counts.json() == {
        "dataset": "empty",
        "done": 0,
        "failed": 0,
        "pending": None,
        "failed_job_ids": [],
    }
