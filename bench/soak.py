"""Soak: thousands of jobs over many adapters through a broker (a private redis-server, or a
vhost of the machine's RabbitMQ) and real workers that are killed (SIGKILL) and restarted on the
way. Not part of the test run; one command:

    python bench/soak.py [--jobs 2000] [--adapters 40] [--kills 3] [--broker redis|amqp]

It reports jobs in, images out, error records, jobs without a sidecar, extra generations (work
redone after a kill: the price of at-least-once delivery) and the queue wait, median and max.
Workers run at the shipped defaults: a killed worker's jobs come back after the visibility timeout.
It stops by itself: every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures.brokers import new_vhost
from fixtures.redis_server import start_redis_server
from fixtures.worker_process import WorkerProcess, worker_flags

from omni_engine.lora.synth import write_random_adapters
from omni_engine.models.loader import load_model, quiet_library_output
from producer import layout
from producer.client import Client
from producer.progress import dataset_status
from producer.schema import validate_job
from producer.storage import open_storage

DEADLINE_S = 1800


def _settled(storage, expected: frozenset[str]) -> int:
    status = dataset_status(storage, "soak", expected)
    return status.done + status.failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--adapters", type=int, default=40)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    args = parser.parse_args(argv)
    quiet_library_output()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("OMNI_CACHE_DIR", str(work / "cache"))
        os.environ.pop("OMNI_VISIBILITY_TIMEOUT", None)  # the shipped default: leases, 60 s
        import torch

        denoiser = load_model("tiny-sd3", device=torch.device("cpu"), dtype=torch.float32).denoiser
        names = [f"a{i}" for i in range(args.adapters)]
        write_random_adapters({work / "adapters" / name: i for i, name in enumerate(names)}, denoiser)
        rng = random.Random(7)
        jobs = [
            validate_job(
                {"prompt": f"soak {i}", "adapter": rng.choice(names), "dataset": "soak", "priority": p}
            )
            for i, p in enumerate(rng.choices(range(10), k=args.jobs))
        ]
        if args.broker == "redis":
            (work / "redis").mkdir()
            server = start_redis_server(work / "redis")
            broker_url, stop_broker = server.url, server.stop
        else:
            vhost = new_vhost()
            broker_url, stop_broker = vhost.url, lambda: vhost.ctl("delete_vhost", vhost.vhost)
        out = str(work / "out")
        storage = open_storage(out)
        extra = ("--idle", "0.2", "--loglevel", "DEBUG", "--max-loras", "2", "--max-cpu-loras", "8")
        flags = worker_flags(broker_url, work / "adapters", out, *extra)  # later flags win
        started = time.perf_counter()
        logs: list[str] = []
        try:
            with Client(broker_url) as client:
                client.submit_many(jobs)
            expected = frozenset(j.job_id for j in jobs)
            for kill in range(args.kills + 1):
                worker = WorkerProcess(flags, dict(os.environ))
                target = len(jobs) * (kill + 1) // (args.kills + 1)
                deadline = time.monotonic() + DEADLINE_S
                while _settled(storage, expected) < target:
                    if time.monotonic() > deadline:
                        raise SystemExit("soak: timed out")
                    time.sleep(0.5)  # progress check, not synchronisation
                if kill < args.kills:
                    worker.stop(signal.SIGKILL)
                else:
                    worker.stop()
                logs.append(worker.log)
        finally:
            stop_broker()
        seconds = time.perf_counter() - started

        status = dataset_status(storage, "soak", expected)
        keys = set(storage.list_keys("soak/"))
        images = sum(k.endswith(layout.IMAGE_SUFFIX) for k in keys)
        generations = sum(int(n) for log in logs for n in re.findall(r"running (\d+) job\(s\)", log))
        sidecars = [layout.sidecar_key("soak", j.job_id) for j in jobs]
        waits = [json.loads(storage.get_bytes(k))["timings"]["queue_wait_s"] for k in sidecars if k in keys]
    print(
        "| jobs in | images out | sidecars | error records | without sidecar | extra generations | "
        "worker kills | wait median s | wait max s | wall s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    missing = len(jobs) - status.done - status.failed
    print(
        f"| {len(jobs)} | {images} | {status.done} | {status.failed} | {missing} "
        f"| {generations - len(jobs)} | {args.kills} | {statistics.median(waits):.1f} | {max(waits):.1f} "
        f"| {seconds:.0f} |"
    )
    return 0 if status.done == len(jobs) and images == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
