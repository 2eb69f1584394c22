"""What each adapter tier costs, on the tiny model and on a larger random one (CPU or GPU).

    python bench/engine.py [--models tiny-sd3 small-sd3] [--reps 5]

Every figure comes from the engine's own per-call timings (`metadata["timings"]`), through the
public API; the resident switch is reported as a ratio of the cold load measured in the same run.
A host-cache hit is a copy into a resident slot: it is compared with copying the adapter's bytes
in memory in the same run (the goal: at most 3 x that copy + 2 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from omni_engine import LoRARequest, Omni
from omni_engine.lora.synth import BENCH_TARGETS, write_random_adapters
from omni_engine.models.loader import quiet_library_output

# A one-step thumbnail: adapter timings do not depend on the image, so keep the image cheap.
THUMBNAIL = {"num_inference_steps": 1, "height": 16, "width": 16}


def copy_time(omni: Omni, weights: Path) -> float:
    """Seconds to copy the adapter's tensors into tensors of the model's dtype on its device."""
    sources = list(load_file(weights).values())
    if omni.device.type == "cuda":
        sources = [t.pin_memory() for t in sources]
    targets = [torch.empty(t.shape, dtype=omni.dtype, device=omni.device) for t in sources]
    started = time.perf_counter()
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source, non_blocking=True)
    if omni.device.type == "cuda":
        torch.cuda.synchronize(omni.device)
    return time.perf_counter() - started


def measure(model: str, reps: int, rank: int, workdir: Path) -> dict[str, float | str]:
    # Unfused: the tiers themselves are measured, never a merge (fuse="auto" merges big calls).
    omni = Omni(model, max_loras=2, max_cpu_loras=8, fuse="never")
    transformer = omni.pipeline.transformer
    seeds = {workdir / f"{model}-{i}": i for i in range(2)}
    adapters = write_random_adapters(seeds, transformer, rank=rank, targets=BENCH_TARGETS)
    a, b = (LoRARequest(f"a{i}", i + 1, str(path)) for i, path in enumerate(adapters))

    def timing(request: LoRARequest | None, scale: float = 1.0, key: str = "adapter_s", size=THUMBNAIL):
        output = omni.generate("bench", lora_request=request, lora_scale=scale, seed=0, **size)[0]
        return output.metadata["timings"][key]

    timing(None)  # warm up the pipeline once
    cold, host, copy, switch, scale = [], [], [], [], []
    weights = adapters[1] / "adapter_model.safetensors"
    for _ in range(reps):
        omni.remove_lora(a.lora_int_id)
        cold.append(timing(a))  # from disk: read, check, inject
        timing(b)
        omni.remove_lora(b.lora_int_id)
        omni.add_lora(b)  # held in host memory, not in the model
        host.append(timing(b))  # host hit: a copy into the slot b left
        copy.append(copy_time(omni, weights))
        switch.append(timing(a))  # both resident now: a switch
        switch.append(timing(b))
        scale.append(timing(b, 0.5))
        scale.append(timing(b, 1.0))
    images = max(2, reps // 2)  # at the model's default size and steps
    base_image = [timing(None, key="generate_s", size={}) for _ in range(images)]
    lora_image = [timing(b, key="generate_s", size={}) for _ in range(images)]
    adapter_mb = weights.stat().st_size / 2**20
    params = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n)
    med = statistics.median
    return {
        "model": f"{model} ({params / 1e6:.2f}M, {omni.device.type})",
        "adapter": f"r{rank}, {adapter_mb:.2f} MB",
        "cold": med(cold),
        "host": med(host),
        "copy": med(copy),
        "switch": med(switch),
        "scale": med(scale),
        "base_image": med(base_image),
        "lora_image": med(lora_image),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd3", "small-sd3"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    quiet_library_output()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(model, args.reps, args.rank, Path(tmp)) for model in args.models]

    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    print(
        "| model | adapter | cold load (disk) ms | host-cache hit ms | resident switch ms | scale change ms "
        "| image, base ms | image, LoRA ms | switch / cold | copy ms | host / (3 x copy + 2 ms) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['adapter']} | {ms(r['cold'])} | {ms(r['host'])} | {ms(r['switch'])} "
            f"| {ms(r['scale'])} | {ms(r['base_image'])} | {ms(r['lora_image'])} "
            f"| {r['switch'] / r['cold']:.4f} | {ms(r['copy'])} | {r['host'] / (3 * r['copy'] + 2e-3):.2f} |"
        )
    print(f"\n{args.reps} repetitions, medians; total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
