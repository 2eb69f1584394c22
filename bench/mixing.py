"""When a call that mixes adapters pays: one call of N prompts over two adapters against the same
N prompts and seeds in one fused call per adapter, side by side in one engine.

    python bench/mixing.py [--models tiny-sd3 small-sd3] [--batch 8] [--reps 3] [--rank 16]

A mixed call saves the calls it replaces (their fixed cost and each one's merge and restore) and
pays the unfused LoRA layers on the rows of every adapter it does not merge (docs/performance.md,
"Mixed calls"). Which wins depends on the device and the model, and decides whether the worker
should fill room in a call with other adapters' jobs (`OMNI_MIX_ADAPTERS`). Every timing is the
median of `--reps` rounds that alternate the two ways, so a drift of the machine's load touches
both alike; the base model's call of N prompts is the unit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omni_engine import LoRARequest, Omni
from omni_engine.lora.synth import BENCH_TARGETS, write_random_adapters
from omni_engine.models.loader import quiet_library_output


def measure(model: str, batch: int, reps: int, rank: int, workdir: Path) -> None:
    """Print, per split of the batch between adapters a and b, one mixed call's median against
    one fused call per adapter, each row as soon as it is measured."""
    omni = Omni(model, max_loras=2, max_cpu_loras=4)
    transformer = omni.pipeline.transformer
    seeds = {workdir / f"{model}-{i}": i for i in range(2)}
    paths = write_random_adapters(seeds, transformer, rank=rank, targets=BENCH_TARGETS)
    a, b = (LoRARequest(f"m{i}", i + 1, str(path)) for i, path in enumerate(paths))
    prompts = [f"picture {i}" for i in range(batch)]

    def call(requests: list[LoRARequest | None], first: int = 0) -> float:
        started = time.perf_counter()
        omni.generate(prompts[first : first + len(requests)], lora_request=requests, seed=first)
        return time.perf_counter() - started

    call([None] * batch)  # warm up
    base = statistics.median(call([None] * batch) for _ in range(reps))
    print(f"| {model} | base model, {batch} prompts (the unit) | {base:.3f} | | |", flush=True)
    for k in sorted({batch - 1, batch // 2 + batch // 4, batch // 2} - {0}):
        both = [a] * k + [b] * (batch - k)
        mixed, separate = [], []
        for rep in range(reps + 1):  # the first round warms both ways up and is not counted
            # Each round runs both ways, so a drift of the machine's load touches both alike.
            one, two = call(both), call([a] * k) + call([b] * (batch - k), k)
            if rep:
                mixed.append(one)
                separate.append(two)
        m, s = statistics.median(mixed), statistics.median(separate)
        row = f"{m:.3f} (x{m / base:.2f}) | {s:.3f} (x{s / base:.2f}) | {m / s:.2f}"
        print(f"| {model} | {k}+{batch - k} | {row} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd3", "small-sd3"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    if args.batch < 2 or args.reps < 1:
        parser.error("--batch must be >= 2 and --reps >= 1")
    quiet_library_output()
    print("| model | prompts of a / b | one mixed call s | one fused call per adapter s | mixed / separate |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            measure(model, args.batch, args.reps, args.rank, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
