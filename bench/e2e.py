"""The whole loop, grouped against FIFO: a private redis-server, a real `omni-batch worker`, the
built-in model, real adapters, a small cache (so only grouping can save loads).

    python bench/e2e.py [--jobs 120] [--adapters 8] [--model tiny-sd3]

The same jobs run twice: with the worker's grouping window (64) and with a window of 1, which
is one job at a time in arrival order. It prints wall time, images per second, cold adapter
loads and the ratios grouped / FIFO, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures.redis_server import RedisServer, free_port
from fixtures.worker_process import WorkerProcess

from omni_engine.lora.synth import write_random_adapters
from omni_engine.models.loader import load_model, quiet_library_output
from producer import layout
from producer.client import Client
from producer.progress import wait_for_jobs
from producer.schema import validate_job
from producer.storage import open_storage


def run(window: int, *, jobs, model: str, adapters: Path, workdir: Path) -> dict[str, float]:
    redis = RedisServer(workdir / f"redis-{window}", port=free_port())
    redis.directory.mkdir()
    redis.start()
    out = workdir / f"out-{window}"
    try:
        with Client(redis.url) as client:
            client.submit_many(jobs)
        flags = ["--broker", redis.url, "--model", model, "--adapter-root", str(adapters), "--out", str(out)]
        flags += ["--max-loras", "1", "--max-cpu-loras", "1", "--window", str(window), "--idle", "0.5"]
        worker = WorkerProcess(flags, dict(os.environ))
        started = time.perf_counter()
        storage = open_storage(str(out))
        ids = frozenset(job.job_id for job in jobs)
        status = wait_for_jobs(storage, jobs[0].dataset, ids, timeout=3600, interval=0.05)
        seconds = time.perf_counter() - started
        worker.stop()
    finally:
        redis.stop()
    assert status.done == len(jobs), f"window {window}: {status.done} of {len(jobs)} done"
    sidecars = [json.loads(storage.get_bytes(layout.sidecar_key(j.dataset, j.job_id))) for j in jobs]
    # The jobs of one engine call share its timings exactly: one call, one entry.
    calls = {
        (s["adapter_sha256"], s["timings"]["adapter_s"], s["timings"]["generate_s"]): s for s in sidecars
    }
    return {
        "seconds": seconds,
        "images_per_s": len(jobs) / seconds,
        "cold_loads": sum(s["adapter_source"] == "disk" for s in calls.values()),
        "calls": len(calls),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--model", default="tiny-sd3")
    args = parser.parse_args(argv)
    quiet_library_output()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.environ.setdefault("OMNI_CACHE_DIR", str(workdir / "cache"))
        import torch

        denoiser = load_model(args.model, device=torch.device("cpu"), dtype=torch.float32).denoiser
        names = [f"style-{i}" for i in range(args.adapters)]
        seeds = {workdir / "adapters" / name: i for i, name in enumerate(names)}
        write_random_adapters(seeds, denoiser, rank=16)
        # Interleaved, as many producers would send them: the worst order for a cache.
        jobs = [
            validate_job({"prompt": f"picture {i}", "adapter": names[i % len(names)], "dataset": "bench"})
            for i in range(args.jobs)
        ]
        grouped = run(64, jobs=jobs, model=args.model, adapters=workdir / "adapters", workdir=workdir)
        fifo = run(1, jobs=jobs, model=args.model, adapters=workdir / "adapters", workdir=workdir)

    print(
        f"{args.jobs} jobs over {args.adapters} adapters, {args.model}, cache of 1 adapter (minimum loads "
        f"{args.adapters})\n"
    )
    print("| policy | wall s | images/s | cold loads | engine calls |")
    print("|---|---:|---:|---:|---:|")
    for label, r in (("FIFO (window 1)", fifo), ("grouped (window 64)", grouped)):
        print(
            f"| {label} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | {r['cold_loads']} | {r['calls']} |"
        )
    print(
        f"\ngrouped / FIFO: images/s x{grouped['images_per_s'] / fifo['images_per_s']:.2f}, "
        f"cold loads x{grouped['cold_loads'] / fifo['cold_loads']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
