"""A real fleet: N `omni-batch worker` processes on one private redis-server, the tiny model, a
dataset queued at once (in one submission, or in waves sent one after another, as a backend sends
batches of a stream); adapter affinity on, then off (every worker on the one `omni` queue), on
the same jobs in the same run. Not part of the test run; one command:

    python bench/fleet_real.py [--workers 3] [--jobs 240] [--adapters 24] [--waves 1] [--held 2]

Reports each mode's cold loads (engine calls that read an adapter's files, from each worker's
metrics endpoint) against the fleet's lower bound (`worker.affinity.lower_bound`), the busiest
worker's share of the jobs over the mean, and the wall time. Each worker holds 1 adapter in the
model and `--held` in host memory, as a GPU worker with many large adapters would, so a load that
affinity saves is one the worker would really pay. It stops by itself: every wait has a deadline.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import redis
from fixtures.redis_server import free_port, start_redis_server
from fixtures.worker_process import WorkerProcess, worker_flags

from omni_engine.lora.synth import write_random_adapters
from omni_engine.models.loader import load_model, quiet_library_output
from producer import defaults as d
from producer.client import Client
from producer.progress import dataset_status
from producer.schema import Job, validate_job
from producer.storage import open_storage
from worker.affinity import lower_bound

DEADLINE_S = 900
ZIPF_S = 1.1
MODES = {"affinity": "--affinity", "one queue": "--no-affinity"}


@dataclass(frozen=True)
class FleetRun:
    mode: str
    cold_loads: int
    jobs_per_worker: tuple[int, ...]
    seconds: float

    @property
    def share(self) -> float:
        """The busiest worker's jobs over the mean."""
        mean = sum(self.jobs_per_worker) / len(self.jobs_per_worker)
        return max(self.jobs_per_worker) / mean if mean else 0.0


def zipf_waves(count: int, adapters: int, waves: int, *, dataset: str, seed: int = 7) -> list[list[Job]]:
    """`count` jobs in `waves` submissions, whose adapters `a0`.. are drawn Zipf(1.1), seeded: the
    same jobs every run."""
    rng = random.Random(seed)
    weights = list(accumulate(1.0 / rank**ZIPF_S for rank in range(1, adapters + 1)))
    picks = rng.choices(range(adapters), cum_weights=weights, k=count)
    jobs = [
        validate_job({"prompt": f"fleet {i}", "adapter": f"a{pick}", "dataset": dataset})
        for i, pick in enumerate(picks)
    ]
    return [jobs[i * count // waves : (i + 1) * count // waves] for i in range(waves)]


def write_adapters(root: Path, count: int) -> None:
    import torch

    denoiser = load_model("tiny-sd3", device=torch.device("cpu"), dtype=torch.float32).denoiser
    write_random_adapters({root / f"a{i}": i for i in range(count)}, denoiser)


def scrape(port: int) -> dict[str, float]:
    """A worker's metrics: each sample line's name and labels, and its value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def done_of(metrics: dict[str, float]) -> int:
    return int(metrics.get("omni_jobs_done_total", 0))


def wait_for(condition, what: str, *, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"fleet_real: timed out waiting for {what}")
        time.sleep(0.2)  # polling a condition with a deadline


def run_fleet(
    mode: str,
    waves: list[list[Job]],
    *,
    workers: int,
    held: int,
    adapters: Path,
    out: str,
    broker_url: str,
) -> FleetRun:
    """Start `workers` workers in `mode`, submit each wave once the fleet is up, wait for every job."""
    ports = [free_port() for _ in range(workers)]
    flags = ("--max-loras", "1", f"--max-cpu-loras={held}", "--window", "16", "--idle", "0.3", MODES[mode])
    fleet = [
        WorkerProcess(
            worker_flags(
                broker_url, adapters, out, *flags, "--hostname", f"w{i}@fleet", "--metrics-port", str(port)
            ),
            dict(os.environ),
        )
        for i, port in enumerate(ports)
    ]
    try:
        if mode == "affinity":
            with redis.Redis.from_url(broker_url) as client:
                wait_for(lambda: client.exists(d.FLEET_PLAN_KEY), "the fleet's first plan")
        started = time.perf_counter()
        with Client(broker_url) as client:
            for wave in waves:
                client.submit_many(wave)
        jobs = [job for wave in waves for job in wave]
        storage = open_storage(out)
        expected = frozenset(j.job_id for j in jobs)
        dataset = jobs[0].dataset

        def settled() -> bool:
            for worker in fleet:
                if worker.proc.poll() is not None:
                    raise SystemExit(f"fleet_real: a worker exited:\n{worker.log[-4000:]}")
            return not dataset_status(storage, dataset, expected).pending

        wait_for(settled, f"{len(jobs)} jobs")
        seconds = time.perf_counter() - started
        # A job's outputs are stored before the worker counts it done: wait for the last counts.
        wait_for(lambda: sum(done_of(scrape(port)) for port in ports) >= len(jobs), "the workers' counts")
        metrics = [scrape(port) for port in ports]
    finally:
        for worker in fleet:
            worker.stop()
    cold = sum(int(m.get('omni_adapter_activations_total{source="disk"}', 0)) for m in metrics)
    done = tuple(done_of(m) for m in metrics)
    return FleetRun(mode, cold, done, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=240)
    parser.add_argument("--adapters", type=int, default=24)
    parser.add_argument(
        "--waves", type=int, default=1, help="submissions the jobs are sent in, one after another"
    )
    parser.add_argument("--held", type=int, default=2, help="adapters each worker holds in host memory")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args(argv)
    quiet_library_output()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("OMNI_CACHE_DIR", str(work / "cache"))
        write_adapters(work / "adapters", args.adapters)
        for mode in args.modes:
            (work / mode).mkdir()
            server = start_redis_server(work / mode)
            try:
                waves = zipf_waves(args.jobs, args.adapters, args.waves, dataset="fleet")
                out, adapters = str(work / mode / "out"), work / "adapters"
                run = run_fleet(
                    mode,
                    waves,
                    workers=args.workers,
                    held=args.held,
                    adapters=adapters,
                    out=out,
                    broker_url=server.url,
                )
                rows.append(run)
            finally:
                server.stop()
        jobs = [job for wave in waves for job in wave]
        bound = lower_bound([job.adapter for job in jobs], args.workers)
        used = len({job.adapter for job in jobs})
    sent = "queued at once" if args.waves == 1 else f"sent in {args.waves} waves, one after another"
    print(
        f"{args.workers} workers, {args.jobs} jobs over {used} of {args.adapters} adapters (Zipf {ZIPF_S}), "
        f"{sent}; each worker holds 1 adapter in the model and {args.held} in host memory.\n"
    )
    print("| mode | cold loads | lower bound | cold / bound | jobs per worker | max share | wall s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for run in rows:
        per = " / ".join(str(n) for n in run.jobs_per_worker)
        cells = [run.mode, run.cold_loads, bound, f"{run.cold_loads / bound:.2f}", per, f"{run.share:.2f}"]
        print("| " + " | ".join(str(c) for c in [*cells, f"{run.seconds:.1f}"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
