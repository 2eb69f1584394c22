"""The multi-adapter tax: one Zipf-skewed workload, base model against omni-batch against a plain
diffusers loop, side by side in one process.

    python bench/tax.py [--models tiny-sd3 small-sd3] [--jobs 48] [--adapters 24] [--rank 16]
                        [--modes base omni-batch omni-batch-mix omni-batch-no-mix
                                 omni-batch-fuse-never omni-batch-fuse-always
                                 diffusers-grouped diffusers-loop]
                        [--reps 5] [--cache 2 4] [--rounds 1]

Every row runs the same N jobs (fixed prompts and seeds; adapters drawn Zipf(1.0) from a fixed seed
over A rank-r adapters) on a fresh pipeline warmed up with one image, timed end to end with the
images stored. `base` runs the jobs with no adapter: the ceiling every other row is a ratio of. The
omni-batch rows are the embedded runner (the worker's scheduler, engine and storage) with a cache
of 2 resident and 4 held adapters (`--cache`); `omni-batch` has the worker's defaults on this
device (it mixes adapters in a call on a GPU, not on a CPU), `omni-batch-mix` mixes and
`omni-batch-no-mix` does not, whatever the device. `diffusers-loop` is what a user writes instead: per
job, `load_lora_weights`, one image, `unload_lora_weights`. `diffusers-grouped` is what a user who
knows that loads cost writes: the jobs grouped by adapter, one load and `fuse_lora` per adapter,
batches of up to eight. The diffusers rows' images are checked against base (the LoRA must change
every image), and the loop's against omni-batch's (they must match within rounding). The diffusers
rows save each PNG and no more; base and the omni-batch rows store as the worker does (PNG and
sidecar, each written atomically and fsynced), which on the tiny model is a tenth of the wall time.

A second table sets a host-cache hit against a plain copy of the same adapter's bytes, with the
resident switch and scale change as bench/engine.py measures them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from omni_engine import LoRARequest, Omni
from omni_engine.lora.adapter import PEFT_PREFIX
from omni_engine.lora.synth import BENCH_TARGETS, write_random_adapters
from omni_engine.models.loader import load_model, quiet_library_output, resolve_device
from producer import layout
from producer.schema import Job, validate_job

# Everything taken from the worker, in one place: the embedded runner and its settings.
from worker.embedded import run_jobs
from worker.settings import DEFAULT_MIX_ADAPTERS, WorkerSettings, build_engine

# The omni-batch rows' cache (--cache): fewer slots than adapters, so the scheduler's order matters.
CACHE = (2, 4)
# The file name diffusers' save_lora_weights writes and load_lora_weights looks for.
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DATASET = "tax"
WORKLOAD_SEED = 0
SUBJECTS = ("a lighthouse at dusk", "a red fox", "a bowl of ramen", "a mountain lake", "a city street")
# A one-step thumbnail: adapter timings do not depend on the image, so keep the image cheap.
THUMBNAIL = {"num_inference_steps": 1, "height": 16, "width": 16}
# The LoRA must move every image by more than this (0..255) from base...
MIN_LORA_CHANGE = 8
# ...and the loop's image must match omni-batch's unfused image within this (batching, rounding),
# in float32. In half precision a merge and a batch round far more coarsely: reported, not checked.
MATCH_TOLERANCE = 2

# --modes name -> (row label, worker settings that differ from the defaults).
# Each label is completed with the fuse mode and the adapters a call may mix, as run.
EMBEDDED_MODES: dict[str, tuple[str, dict[str, object]]] = {
    "omni-batch": ("omni-batch, defaults", {}),
    "omni-batch-mix": ("omni-batch, mixing", {"mix_adapters": DEFAULT_MIX_ADAPTERS}),
    "omni-batch-no-mix": ("omni-batch, no mixing", {"mix_adapters": 1}),
    "omni-batch-fuse-never": ("omni-batch, fuse never", {"fuse": "never"}),
    "omni-batch-fuse-always": ("omni-batch, fuse always", {"fuse": "always"}),
}
PLAIN_MODES = ("diffusers-grouped", "diffusers-loop")
MODES = ("base", *EMBEDDED_MODES, *PLAIN_MODES)
# The row whose images the loop must match: the first of these that ran (unfused, when fuse exists).
UNFUSED_REFERENCES = ("omni-batch-fuse-never", "omni-batch")


@dataclass(frozen=True)
class Workload:
    model: str
    jobs: list[Job]  # the measured jobs, each with its adapter
    base_jobs: list[Job]  # the same prompts and seeds, no adapter
    adapter_root: Path


@dataclass
class Row:
    mode: str
    label: str
    seconds: float
    images: int
    calls: int  # pipeline calls
    disk_loads: int
    stall_s: float | None  # summed over engine calls; None where the sidecars do not record it
    out: Path


def zipf_draw(count: int, adapters: int, *, seed: int) -> list[int]:
    """`count` adapter indices, index k drawn with probability proportional to 1 / (k + 1)."""
    weights = [1.0 / (k + 1) for k in range(adapters)]
    return random.Random(seed).choices(range(adapters), weights=weights, k=count)


def make_workload(model: str, *, jobs: int, adapters: int, rank: int, workdir: Path) -> Workload:
    # 1. Adapters, written once as diffusers' own `save_lora_weights` writes them (keys and header
    #    config prefixed by `transformer.`), which both omni-batch and `pipe.load_lora_weights` read.
    #    Not synth's layout="diffusers": its unprefixed header config is the model-level layout,
    #    which `pipe.load_lora_weights` filters away (PEFT then fails with KeyError 'model_type').
    root = workdir / f"adapters-{model}"
    loaded = load_model(model, device=torch.device("cpu"), dtype=torch.float32)
    names = [f"style-{i:02d}" for i in range(adapters)]
    seeds = {workdir / f"peft-{model}" / name: i for i, name in enumerate(names)}
    peft_dirs = write_random_adapters(seeds, loaded.denoiser, rank=rank, targets=BENCH_TARGETS)
    for name, peft_dir in zip(names, peft_dirs, strict=True):
        tensors = load_file(peft_dir / "adapter_model.safetensors")
        type(loaded.pipeline).save_lora_weights(
            root / name,
            transformer_lora_layers={k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()},
            transformer_lora_adapter_metadata=json.loads((peft_dir / "adapter_config.json").read_text()),
        )

    # 2. Jobs: fixed prompts, seeds and ids; adapters skewed as real traffic is.
    drawn = zipf_draw(jobs, adapters, seed=WORKLOAD_SEED)

    def job(i: int, adapter: str | None) -> Job:
        prompt = f"{SUBJECTS[i % len(SUBJECTS)]}, picture {i}"
        fields = {"job_id": f"job-{i:04d}", "dataset": DATASET, "prompt": prompt, "seed": 1000 + i}
        return validate_job({**fields, "adapter": adapter})

    return Workload(
        model=model,
        jobs=[job(i, names[k]) for i, k in enumerate(drawn)],
        base_jobs=[job(i, None) for i in range(jobs)],
        adapter_root=root,
    )


def run_embedded(work: Workload, mode: str, out: Path, cache: tuple[int, int]) -> Row:
    """The embedded runner, with the settings it gets in production and a fresh engine."""
    if mode == "base":
        label, jobs, overrides = "base (no adapter)", work.base_jobs, {}
    else:
        (label, overrides), jobs = EMBEDDED_MODES[mode], work.jobs
        overrides = {"max_loras": cache[0], "max_cpu_loras": cache[1], **overrides}
    settings = WorkerSettings(
        model=work.model, adapter_roots=(str(work.adapter_root),), output_uri=str(out), **overrides
    )
    engine = build_engine(settings)  # as the worker builds it
    if mode != "base":
        mix = settings.policy_on(engine.device).mix_adapters
        label += (
            f" (fuse {settings.fuse.value}, {f'up to {mix} adapters' if mix > 1 else 'one adapter'} a call)"
        )
    engine.generate("warm up", seed=0)
    loads_before = engine.lora_stats()["disk_loads"]

    started = time.perf_counter()
    summary = run_jobs(jobs, engine=engine, settings=settings)
    seconds = time.perf_counter() - started

    if (summary.images, summary.failed) != (len(jobs), 0):
        raise RuntimeError(f"{mode}: {summary.images} images and {summary.failed} failures of {len(jobs)}")
    calls, stall_s = calls_and_stall(out, jobs)
    return Row(
        mode=mode,
        label=label,
        seconds=seconds,
        images=summary.images,
        calls=calls,
        disk_loads=engine.lora_stats()["disk_loads"] - loads_before,
        stall_s=stall_s,
        out=out,
    )


def calls_and_stall(out: Path, jobs: list[Job]) -> tuple[int, float | None]:
    """From the sidecars: the engine calls made (a call's jobs share its timings), and the seconds
    the denoiser waited for an adapter, summed over calls and their adapters."""
    calls, stalls = set(), {}
    for job in jobs:
        record = json.loads((out / layout.sidecar_key(job.dataset, job.job_id)).read_bytes())
        timings = record["timings"]
        call = (timings["adapter_s"], timings["generate_s"])
        calls.add(call)
        stalls[(record["adapter_sha256"], *call)] = timings
    if not any("stall_s" in t for t in stalls.values()):
        return len(calls), None
    return len(calls), sum(t.get("stall_s", 0.0) for t in stalls.values())


def plain_pipeline(work: Workload, out: Path):
    """The model as a user of diffusers loads it, warmed up with one image; its call settings."""
    device, dtype = resolve_device(None, None)  # what Omni picks
    model = load_model(work.model, device=device, dtype=dtype)
    defaults = model.defaults
    size = {"height": defaults.height, "width": defaults.width}
    call = {"num_inference_steps": defaults.steps, "guidance_scale": defaults.guidance_scale, **size}
    generator_device = "cpu" if device.type == "mps" else device.type
    model.pipeline("warm up", generator=torch.Generator(generator_device).manual_seed(0), **call)
    (out / DATASET).mkdir(parents=True)
    return model, call, generator_device


def run_diffusers_grouped(work: Workload, out: Path, batch: int = 8) -> Row:
    """What a user who knows that loads cost writes: the jobs grouped by adapter (largest group
    first), per adapter one `load_lora_weights` and one `fuse_lora`, its jobs in calls of up to
    `batch`, then `unfuse_lora` and `unload_lora_weights`."""
    model, call, generator_device = plain_pipeline(work, out)
    pipe = model.pipeline
    component = next(name for name in ("transformer", "unet") if getattr(pipe, name, None) is model.denoiser)
    groups: dict[str, list[Job]] = {}
    for job in work.jobs:
        groups.setdefault(job.adapter, []).append(job)

    started, calls = time.perf_counter(), 0
    for adapter, jobs in sorted(groups.items(), key=lambda item: -len(item[1])):
        pipe.load_lora_weights(str(work.adapter_root / adapter), adapter_name="job", use_safetensors=True)
        pipe.fuse_lora(components=[component], lora_scale=1.0)
        for at in range(0, len(jobs), batch):
            calls += 1
            chunk = jobs[at : at + batch]
            generators = [torch.Generator(generator_device).manual_seed(j.seed) for j in chunk]
            images = pipe([j.prompt for j in chunk], generator=generators, **call).images
            for job, image in zip(chunk, images, strict=True):
                image.save(out / layout.image_key(job.dataset, job.job_id))
        pipe.unfuse_lora(components=[component])
        pipe.unload_lora_weights()
    seconds = time.perf_counter() - started
    label = f"diffusers, grouped by adapter (load, fuse_lora, batches of {batch}, unload)"
    return Row("diffusers-grouped", label, seconds, len(work.jobs), calls, len(groups), None, out)


def run_diffusers_loop(work: Workload, out: Path) -> Row:
    """Per job, in arrival order: load the adapter, generate one image, save it, unload."""
    model, call, generator_device = plain_pipeline(work, out)
    pipe = model.pipeline

    started = time.perf_counter()
    for job in work.jobs:
        # use_safetensors: never let diffusers fall back to unpickling a .bin.
        pipe.load_lora_weights(str(work.adapter_root / job.adapter), adapter_name="job", use_safetensors=True)
        generator = torch.Generator(generator_device).manual_seed(job.seed)
        image = pipe(job.prompt, generator=generator, **call).images[0]
        image.save(out / layout.image_key(job.dataset, job.job_id))
        pipe.unload_lora_weights()
    seconds = time.perf_counter() - started

    # Never trust a load (DESIGN.md): it must have wrapped every layer the adapter targets.
    first = work.adapter_root / work.jobs[0].adapter
    targeted = sum(k.endswith(".lora_A.weight") for k in load_file(first / WEIGHT_NAME))
    pipe.load_lora_weights(str(first), adapter_name="check", use_safetensors=True)
    wrapped = sum(1 for m in model.denoiser.modules() if "check" in getattr(m, "lora_A", {}))
    pipe.unload_lora_weights()
    if wrapped != targeted:
        raise RuntimeError(
            f"diffusers-loop: load_lora_weights({first}) wrapped {wrapped} of {targeted} layers"
        )
    jobs = len(work.jobs)
    return Row("diffusers-loop", "plain diffusers loop", seconds, jobs, jobs, jobs, None, out)


def images_of(row: Row, jobs: list[Job]) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(row.out / layout.image_key(j.dataset, j.job_id)).convert("RGB"), dtype=np.int16)
        for j in jobs
    ]


def largest_diffs(row: Row, other: Row, jobs: list[Job], other_jobs: list[Job]) -> list[int]:
    """Per job, the largest difference of any pixel channel (0..255) between two rows' images."""
    pairs = zip(images_of(row, jobs), images_of(other, other_jobs), strict=True)
    return [int(np.abs(a - b).max()) for a, b in pairs]


def check_plain(rows: dict[str, Row], work: Workload) -> tuple[list[str], bool]:
    """The diffusers rows must apply the LoRA (every image moves from base); the loop's images must
    match omni-batch's unfused ones. The grouped row's are reported: `unfuse_lora` subtracts, so its
    base weights drift from one adapter to the next."""
    lines, ok = [], True
    reference = next((m for m in UNFUSED_REFERENCES if m in rows), None)
    full_precision = resolve_device(None, None)[1] == torch.float32  # the dtype Omni and the loop ran in
    for plain in [m for m in PLAIN_MODES if m in rows]:
        row = rows[plain]
        if "base" in rows:
            change = largest_diffs(row, rows["base"], work.jobs, work.base_jobs)
            changed = sum(c > MIN_LORA_CHANGE for c in change)
            ok &= changed == len(change)
            lines.append(
                f"check: {row.label} vs base: {changed}/{len(change)} images changed by > {MIN_LORA_CHANGE} "
                f"(smallest max |diff| {min(change)})"
            )
        for mode in [m for m in rows if m in EMBEDDED_MODES]:
            diff = max(largest_diffs(row, rows[mode], work.jobs, work.jobs))
            enforced = plain == "diffusers-loop" and mode == reference and full_precision
            ok &= diff <= MATCH_TOLERANCE or not enforced
            bound = f"<= {MATCH_TOLERANCE} required" if enforced else "not checked"
            lines.append(f"check: {row.label} vs {rows[mode].label}: largest |diff| {diff} ({bound})")
    if lines:
        lines.append(f"check: {'ok' if ok else 'FAILED'}")
    return lines, ok


def median_ms(fn: Callable[[], float], reps: int) -> float:
    return statistics.median(fn() for _ in range(reps)) * 1e3


def measure_host_hit(work: Workload, reps: int) -> dict[str, float]:
    """A host-cache hit against a copy of the same adapter's bytes, all in one engine."""
    omni = Omni(work.model, max_loras=2, max_cpu_loras=8, fuse="never")  # the unfused tiers
    a, b = (LoRARequest(f"style-{i:02d}", i + 1, str(work.adapter_root / f"style-{i:02d}")) for i in range(2))

    def timing(request: LoRARequest | None, scale: float = 1.0) -> float:
        output = omni.generate("bench", lora_request=request, lora_scale=scale, seed=0, **THUMBNAIL)[0]
        return output.metadata["timings"]["adapter_s"]

    timing(None)  # warm up the pipeline once
    timing(a)
    host, switch, scale = [], [], []
    for _ in range(reps):
        omni.remove_lora(b.lora_int_id)
        omni.add_lora(b)  # held in host memory, not in the model
        host.append(timing(b))  # host hit: inject only
        switch.append(timing(a))  # both resident now: a switch
        switch.append(timing(b))
        scale.append(timing(b, 0.5))
        scale.append(timing(b, 1.0))
    nbytes = next(info.nbytes for info in omni.list_loras() if info.name == b.lora_name)

    # The floor: the same bytes from host memory (pinned on a GPU host, as the engine holds them)
    # to the model's device.
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=omni.device.type == "cuda")
    target = torch.empty(nbytes, dtype=torch.uint8, device=omni.device)

    def copy() -> float:
        if omni.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        target.copy_(source)
        if omni.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    copy()
    med = statistics.median
    return {
        "mb": nbytes / 2**20,
        "host": med(host) * 1e3,
        "memcpy": median_ms(copy, max(reps, 5)),
        "switch": med(switch) * 1e3,
        "scale": med(scale) * 1e3,
    }


def print_tables(work: Workload, runs: dict[str, list[Row]], host: dict[str, float] | None, args) -> None:
    """Per mode, medians over rounds; `vs base` is the median of each round's own ratio."""
    adapters_used = len({j.adapter for j in work.jobs})
    print(
        f"\n### {work.model}: {len(work.jobs)} jobs, adapters Zipf(1.0) over {args.adapters} "
        f"(rank {args.rank}, {adapters_used} used), cache {args.cache[0]} resident / {args.cache[1]} held, "
        f"medians of {args.rounds} round(s)\n"
    )
    med = statistics.median
    base = runs.get("base")
    print("| config | wall s | vs base | images/s | calls | disk loads | adapter stall, % of wall |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rounds in runs.values():
        row, seconds = rounds[-1], med(r.seconds for r in rounds)
        ratio = (
            f"x{med(r.seconds / b.seconds for r, b in zip(rounds, base, strict=True)):.3f}" if base else "n/a"
        )
        stalls = [100 * r.stall_s / r.seconds for r in rounds if r.stall_s is not None]
        stall = f"{med(stalls):.1f}%" if stalls else "n/a"
        print(
            f"| {row.label} | {seconds:.2f} | {ratio} | {row.images / seconds:.2f} "
            f"| {row.calls} | {row.disk_loads} | {stall} |"
        )
    if host is not None:
        print(
            "\n| adapter | host hit ms | memcpy ms | host hit / memcpy | resident switch ms "
            "| scale change ms |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        print(
            f"| r{args.rank}, {host['mb']:.2f} MB | {host['host']:.3f} | {host['memcpy']:.4f} "
            f"| x{host['host'] / host['memcpy']:.0f} | {host['switch']:.3f} | {host['scale']:.3f} |"
        )


def machine() -> str:
    device, dtype = resolve_device(None, None)  # what Omni and the loop pick
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} cores"
    return (
        f"device {device} ({name}), {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd3", "small-sd3"])
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--adapters", type=int, default=24)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--reps", type=int, default=5, help="repetitions of the host-hit table")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of every row, alternating in order; the table shows medians",
    )
    parser.add_argument(
        "--cache",
        nargs=2,
        type=int,
        default=list(CACHE),
        metavar=("RESIDENT", "HELD"),
        help="the omni-batch rows' max_loras and max_cpu_loras (the worker's defaults: 4 16)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.adapters < 2 or args.rounds < 1:
        parser.error("--jobs and --rounds must be >= 1 and --adapters >= 2")
    quiet_library_output()

    print(machine())
    started = time.perf_counter()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for model in args.models:
            work = make_workload(
                model, jobs=args.jobs, adapters=args.adapters, rank=args.rank, workdir=workdir
            )
            modes = [m for m in MODES if m in args.modes]  # the table's order, not the flag's
            runs: dict[str, list[Row]] = {mode: [] for mode in modes}
            for round_ in range(args.rounds):
                # Every other round backwards, so a drift of the machine's speed touches all rows alike.
                for mode in modes if round_ % 2 == 0 else modes[::-1]:
                    out = workdir / f"out-{model}-{mode}-{round_}"
                    if mode == "diffusers-loop":
                        row = run_diffusers_loop(work, out)
                    elif mode == "diffusers-grouped":
                        row = run_diffusers_grouped(work, out)
                    else:
                        row = run_embedded(work, mode, out, tuple(args.cache))
                    runs[mode].append(row)
                    # As it goes: a run cut short by a time limit still leaves its rows.
                    print(f"{model} round {round_} {mode}: {row.seconds:.2f} s", file=sys.stderr, flush=True)
            host = measure_host_hit(work, args.reps) if args.reps > 0 else None
            print_tables(work, runs, host, args)
            rows = {mode: rounds[-1] for mode, rounds in runs.items()}
            lines, model_ok = check_plain(rows, work)
            ok &= model_ok
            print("\n" + "\n".join(lines) if lines else "")
    print(f"\ntotal {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
