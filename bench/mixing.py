"""When a call that mixes adapters pays: one call of N prompts over two adapters against the same
prompts in one fused call per adapter, side by side in one engine.

    python bench/mixing.py [--models tiny-sd3 small-sd3] [--batch 8] [--reps 3]

A mixed call saves the calls it replaces (their fixed cost and each one's merge and restore) and
pays the unfused LoRA layers on the rows of every adapter it does not merge (docs/performance.md,
"Mixed calls"). Which wins depends on the device and the model, and decides whether the worker
should fill room in a call with other adapters' jobs (`OMNI_MIX_ADAPTERS`). Every timing is the
median of `--reps` rounds, each round running every case once, so a drift of the machine's load
touches all of them alike; the base model's call of N is the unit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omni_engine import LoRARequest, Omni
from omni_engine.lora.synth import write_random_adapter
from omni_engine.models.loader import quiet_library_output

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "ff.net.2")


def measure(model: str, batch: int, reps: int, rank: int, workdir: Path) -> list[tuple[str, float, float]]:
    """(case, mixed seconds, separate seconds) per split of the batch between adapters a and b."""
    omni = Omni(model, max_loras=2, max_cpu_loras=4)
    paths = [
        write_random_adapter(
            workdir / f"{model}-{i}", omni.pipeline.transformer, rank=rank, targets=TARGETS, seed=i
        )
        for i in range(2)
    ]
    a, b = (LoRARequest(f"m{i}", i + 1, str(path)) for i, path in enumerate(paths))
    prompts = [f"picture {i}" for i in range(batch)]

    def call(requests: list[LoRARequest | None]) -> float:
        started = time.perf_counter()
        omni.generate(prompts[: len(requests)], lora_request=requests, seed=0)
        return time.perf_counter() - started

    splits = sorted({batch - 1, batch // 2 + batch // 4, batch // 2} - {0})
    cases = {"base": lambda: call([None] * batch)}
    for k in splits:
        cases[f"mixed {k}+{batch - k}"] = lambda k=k: call([a] * k + [b] * (batch - k))
        cases[f"fused {k} | {batch - k}"] = lambda k=k: call([a] * k) + call([b] * (batch - k))
    for run in cases.values():  # warm up every path once, both adapters resident
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, run in cases.items():
            times[name].append(run())
    med = {name: statistics.median(values) for name, values in times.items()}
    rows = [("base", med["base"], med["base"])]
    rows += [
        (f"{k}+{batch - k}", med[f"mixed {k}+{batch - k}"], med[f"fused {k} | {batch - k}"]) for k in splits
    ]
    return rows


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
            rows = measure(model, args.batch, args.reps, args.rank, Path(tmp))
            base = rows[0][1]
            print(f"| {model} | base model, {args.batch} prompts (the unit) | {base:.3f} | | |")
            for split, mixed, separate in rows[1:]:
                print(
                    f"| {model} | {split} | {mixed:.3f} (x{mixed / base:.2f}) | {separate:.3f} "
                    f"(x{separate / base:.2f}) | {mixed / separate:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
