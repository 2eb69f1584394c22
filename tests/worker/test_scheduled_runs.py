"""Scheduled datasets end to end: a real beat sends runs, a real worker turns them into images."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import redis
from fixtures.beat_process import beat_flags
from fixtures.command_process import OMNI_BATCH
from fixtures.worker_process import wait_settled, worker_flags

from producer import layout
from producer.run_ledger import RunLedger
from producer.schedule_file import load_schedules
from producer.storage import open_storage

RUN_TIMEOUT_S = 120.0
POLL_S = 0.1


def test_each_run_of_a_schedule_becomes_its_own_dataset_of_images(
    redis_url: str, six_adapters: Path, start_worker, start_beat, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    schedule_file = tmp_path / "schedules.yaml"
    job_file = tmp_path / "styles.jsonl"
    job_file.write_text(
        '{"prompt": "a red fox", "adapter": "style-0", "steps": 2, "width": 32, "height": 32}\n'
        '{"prompt": "a blue bird", "adapter": "style-1", "steps": 2, "width": 32, "height": 32}\n'
    )
    schedule_file.write_text(
        f"schedules:\n  - name: styles\n    every: 3s\n    job_file: styles.jsonl\n    output: {out}\n"
    )
    (schedule,) = load_schedules(schedule_file, adapter_roots=[str(six_adapters)])
    worker = start_worker(*worker_flags(redis_url, six_adapters, str(out)))
    beat = start_beat(*beat_flags(schedule_file, redis_url), "--adapter-root", str(six_adapters))

    # The first two runs the beat sends, read from its record in Redis.
    ledger = RunLedger(redis.Redis.from_url(redis_url, decode_responses=True))
    runs: dict[str, str] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(runs) < 2:
        assert time.monotonic() < deadline, f"runs sent: {runs}\n{beat.log}"
        if (last := ledger.last_run("styles")) is not None:
            runs[last.dataset] = last.scheduled_at
        time.sleep(POLL_S)  # polling Redis with a deadline

    storage = open_storage(str(out))
    for dataset, scheduled_at in runs.items():
        jobs = schedule.jobs(datetime.fromisoformat(scheduled_at))
        assert {job.dataset for job in jobs} == {dataset}
        status = wait_settled(storage, dataset, (job.job_id for job in jobs), worker=worker)
        assert (status.done, status.failed) == (2, 0)
        for job in jobs:
            assert storage.get_bytes(layout.image_key(dataset, job.job_id)).startswith(b"\x89PNG")
            sidecar = json.loads(storage.get_bytes(layout.sidecar_key(dataset, job.job_id)))
            assert (sidecar["job"]["dataset"], sidecar["adapter"]) == (dataset, job.adapter)
        # `status` finds a run's jobs from the job file, given the run's dataset and the schedule's output.
        status_command = [str(OMNI_BATCH), "status", "--dataset", dataset, "--jobs", str(job_file)]
        status_command += ["--output", str(out), "--out", str(out), "--json"]
        counted = json.loads(
            subprocess.run(status_command, capture_output=True, text=True, check=True).stdout
        )
        assert (counted["done"], counted["pending"]) == (2, 0), counted
    assert beat.stop() == 0
