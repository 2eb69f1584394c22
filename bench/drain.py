"""Drain rate: how fast one worker takes and acks jobs that need no generation (already done), so
what is measured is the broker and the consumer alone: the take, the record, the ack.

    python bench/drain.py [--jobs 3000]

It submits the jobs to a private redis-server, writes each job's sidecar first (so the worker
skips it as done), starts a real `omni-batch worker` and times it from ready to an empty queue.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures.redis_server import start_redis_server
from fixtures.worker_process import WorkerProcess, wait_drained

from producer import layout
from producer.client import Client
from producer.defaults import QUEUE
from producer.schema import validate_job
from producer.storage import open_storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "redis").mkdir()
        redis = start_redis_server(work / "redis")
        try:
            jobs = [validate_job({"prompt": f"drain {i}", "dataset": "drain"}) for i in range(args.jobs)]
            storage = open_storage(str(work / "out"))
            for job in jobs:
                storage.put_bytes(layout.sidecar_key(job.dataset, job.job_id), b"{}")
            with Client(redis.url) as client:
                client.submit_many(jobs)
            flags = ["--broker", redis.url, "--out", str(work / "out"), "--idle", "0.2"]
            worker = WorkerProcess(flags, dict(os.environ))
            # The worker may take some before it says it is ready: count what is left then.
            started = time.perf_counter()
            client = redis.client()
            left = client.hlen("unacked") + sum(client.llen(key) for key in client.keys(f"{QUEUE}*"))
            wait_drained(client, worker=worker)
            seconds = time.perf_counter() - started
            worker.stop()
        finally:
            redis.stop()
    print(f"{left} done jobs drained in {seconds:.2f} s: {left / seconds:.0f} jobs/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
