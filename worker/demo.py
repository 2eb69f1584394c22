"""`omni-batch demo`: a few adapters for the tiny model, a mixed job list, the embedded runner.

No broker, no S3, no model hub: it shows the product's point, that grouping jobs by adapter keeps
adapter loads at the minimum where running them in arrival order would load again and again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

from omni_engine.lora.lru import LRUCache
from omni_engine.lora.synth import write_random_adapters
from producer.schema import Job, validate_job
from worker.embedded import RunSummary, run_jobs
from worker.settings import WorkerSettings, build_engine

DEMO_ADAPTERS = ("watercolor", "pixel-art", "neon", "charcoal")
SUBJECTS = (
    "a lighthouse at dusk",
    "a red fox",
    "a bowl of ramen",
    "a mountain lake",
    "a city street",
    "a cat",
)
DEMO_DATASET = "demo"
# Small caches, so only grouping can save loads: 4 adapters never fit at once.
DEMO_MAX_LORAS = 1
DEMO_MAX_CPU_LORAS = 2


def demo_jobs() -> list[Job]:
    """Jobs as a busy producer sends them: adapters interleaved, a few base-model jobs mixed in."""
    jobs = []
    for subject, adapter in itertools.product(SUBJECTS, (*DEMO_ADAPTERS, None)):
        jobs.append(
            validate_job(
                {
                    "dataset": DEMO_DATASET,
                    "prompt": subject,
                    "adapter": adapter,
                    "scale": 1.0 if subject != "a cat" else 0.5,
                    "metadata": {"source": "omni-batch demo"},
                }
            )
        )
    return jobs


def fifo_loads(jobs: list[Job], capacity: int) -> int:
    """Disk loads one-at-a-time, arrival-order execution would need with the same cache size."""
    cache: LRUCache[str, None] = LRUCache(capacity)
    loads = 0
    for job in jobs:
        if job.adapter is None:
            continue
        if job.adapter in cache:
            cache.touch(job.adapter)
        else:
            loads += 1
            cache.put(job.adapter, None)
    return loads


def run_demo(out: Path, *, on_done: Callable[[int], None] | None = None) -> tuple[RunSummary, int]:
    """Run the demo into `out`; returns the summary and the FIFO loads to compare against."""
    out = out.resolve()
    adapter_root = out / "adapters"
    settings = WorkerSettings(
        adapter_roots=(str(adapter_root),),
        max_loras=DEMO_MAX_LORAS,
        max_cpu_loras=DEMO_MAX_CPU_LORAS,
        output_uri=str(out / "images"),
    )
    engine = build_engine(settings)
    missing = {
        adapter_root / name: seed
        for seed, name in enumerate(DEMO_ADAPTERS)
        if not (adapter_root / name).is_dir()
    }
    if missing:
        write_random_adapters(missing, engine.pipeline.transformer, rank=8)
    jobs = demo_jobs()
    return run_jobs(jobs, engine=engine, settings=settings, on_done=on_done), fifo_loads(
        jobs, DEMO_MAX_CPU_LORAS
    )
