"""The API with real parts behind it: a real `omni-batch worker` process (tiny model, real adapters),
a real redis-server, outputs in a directory or on S3 over HTTP (moto's server). Clients are plain
`curl` (subprocess) and the `openai` package, used as their users use them. Nothing is mocked."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import openai
import pytest
import requests
from fixtures.api_server import TOKEN
from fixtures.s3_server import FAKE_SECRET_ACCESS_KEY
from fixtures.worker_process import DONE_TIMEOUT_S, POLL_S, assert_alive, worker_flags

from producer.layout import image_key, sidecar_key
from producer.storage import open_storage

AUTH = f"Authorization: Bearer {TOKEN}"


def curl(*args: str) -> tuple[int, bytes]:
    """`curl ARGS`: the HTTP status and the body."""
    command = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args]
    result = subprocess.run(command, capture_output=True, timeout=120, check=True)
    body, _, status = result.stdout.rpartition(b"\n")
    return int(status), body


def wait_for_outcome(status_url: str, worker) -> dict:
    """GET the status URL until the job is no longer queued; fails fast if the worker died."""
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while True:
        status = requests.get(status_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
        if status["status"] != "queued":
            return status
        assert_alive(worker)
        assert time.monotonic() < deadline, f"{status_url} never settled:\n{worker.log[-4000:]}"
        time.sleep(POLL_S)  # polling a condition with a deadline


def test_jobs_posted_with_curl_come_back_done_or_failed_with_their_files(
    redis_url, six_adapters, start_worker, start_api, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    worker = start_worker(*worker_flags(redis_url, six_adapters, str(out)))
    api = start_api("--broker", redis_url, "--out", str(out), tokens=TOKEN)
    jobs = [
        {"prompt": "a red barn", "dataset": "farm", "adapter": "style-0"},
        {"prompt": "who?", "dataset": "farm", "adapter": "no-such-style"},
    ]
    status, body = curl(
        "-X", "POST", f"{api.url}/v1/jobs", "-H", AUTH, "-H", "Content-Type: application/json",
        "--data-binary", json.dumps(jobs),
    )  # fmt: skip
    assert status == 202, body
    good, bad = json.loads(body)["jobs"]

    done = wait_for_outcome(good["status_url"], worker)
    assert done["status"] == "done"
    status, image = curl("-H", AUTH, done["image_url"])
    assert status == 200
    assert image == (out / "farm" / f"{good['job_id']}.png").read_bytes()
    status, sidecar = curl("-H", AUTH, done["sidecar_url"])
    assert json.loads(sidecar)["status"] == "ok" and json.loads(sidecar)["adapter"] == "style-0"

    failed = wait_for_outcome(bad["status_url"], worker)
    assert failed["status"] == "failed"
    assert failed["error"]["error_type"] == "AdapterNotFoundError"
    assert "no-such-style" in failed["error"]["error"]

    status, counts = curl("-H", AUTH, f"{api.url}/v1/datasets/farm")
    assert json.loads(counts) == {
        "dataset": "farm", "done": 1, "failed": 1, "pending": None, "failed_job_ids": [bad["job_id"]],
    }  # fmt: skip
    # Files are only the layout's keys inside the output.
    for path in ("farm/..%2F..%2Fsecrets.png", "farm/whatever.txt", "farm/nothing-here.png"):
        status, _ = curl("-H", AUTH, f"{api.url}/v1/files/{path}")
        assert status == 404, path
    status, _ = curl(done["image_url"])
    assert status == 401


def test_the_openai_client_generates_with_a_lora_and_gets_the_stored_images(
    redis_url, s3_bucket, six_adapters, make_adapter, start_worker, start_api
) -> None:
    worker = start_worker(*worker_flags(redis_url, six_adapters, s3_bucket.uri))
    api = start_api(
        "--broker", redis_url, "--out", s3_bucket.uri, "--adapter-root", str(six_adapters), tokens=TOKEN
    )  # fmt: skip
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key=TOKEN, max_retries=0, timeout=DONE_TIMEOUT_S)
    lora = {"name": "ink", "local_path": str(six_adapters / "style-1"), "scale": 0.5}
    request = {
        "model": "tiny-sd3", "prompt": "a lighthouse", "n": 2, "size": "32x32",
        "extra_body": {"seed": 7, "num_inference_steps": 2, "lora": lora},
    }  # fmt: skip
    storage = open_storage(s3_bucket.uri)

    result = client.images.generate(**request, response_format="b64_json")

    jobs = result.model_extra["jobs"]
    assert len(result.data) == len(jobs) == 2
    for item, job in zip(result.data, jobs, strict=True):
        assert base64.b64decode(item.b64_json) == storage.get_bytes(image_key("images", job["job_id"]))
        sidecar = json.loads(storage.get_bytes(sidecar_key("images", job["job_id"])))
        job_fields = (sidecar["adapter"], sidecar["job"]["scale"], sidecar["job"]["priority"])
        assert job_fields == ("style-1", 0.5, 9)
        assert (sidecar["width"], sidecar["height"], sidecar["steps"]) == (32, 32, 2)
    seeds = [json.loads(storage.get_bytes(sidecar_key("images", j["job_id"])))["seed"] for j in jobs]
    assert seeds == [7, 8]

    # The same request (same seed) is the same jobs, already done: now as presigned S3 URLs.
    again = client.images.generate(**request, response_format="url")
    assert [j["job_id"] for j in again.model_extra["jobs"]] == [j["job_id"] for j in jobs]
    for item, job in zip(again.data, jobs, strict=True):
        assert FAKE_SECRET_ACCESS_KEY not in item.url
        stored = storage.get_bytes(image_key("images", job["job_id"]))
        assert requests.get(item.url, timeout=30).content == stored

    # An adapter outside the roots is refused before anything is queued.
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.images.generate(prompt="x", extra_body={"lora": {"local_path": "/etc/secrets"}})
    assert "lora.local_path = '/etc/secrets' is not under the adapter roots" in str(refused.value)

    # An adapter the worker cannot find fails the request with the worker's reason; once the
    # adapter is there, the same request (the same jobs) succeeds: the old record is not the answer.
    late = {"prompt": "x", "size": "32x32", "extra_body": {"seed": 3, "lora": {"local_path": "late-style"}}}
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        client.images.generate(**late)
    assert "AdapterNotFoundError" in str(failed.value) and "late-style" in str(failed.value)
    make_adapter("late-style")
    assert len(client.images.generate(**late).data) == 1

    # Asked not to wait: 202 with the job's status URL, which later says done.
    status, body = curl(
        "-X", "POST", f"{api.url}/v1/images/generations", "-H", AUTH, "-H", "Prefer: wait=0",
        "-H", "Content-Type: application/json", "--data-binary",
        json.dumps({"prompt": "a quiet harbour", "size": "32x32", "num_inference_steps": 2}),
    )  # fmt: skip
    assert status == 202, body
    (pending,) = json.loads(body)["jobs"]
    assert json.loads(body)["data"] == []
    assert wait_for_outcome(pending["status_url"], worker)["status"] == "done"
