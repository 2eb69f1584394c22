"""Real PEFT adapters with random weights, for tests, the demo and benchmarks (no model hub here)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from omni_engine.lora.adapter import DIFFUSERS_METADATA_KEY
from omni_engine.lora.formats import PEFT_PREFIX

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The benchmarks' adapters: an SD3 block's attention, its text-side projections and its feed-forward.
BENCH_TARGETS = (*DEFAULT_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "ff.net.2")
LAYOUTS = ("peft", "diffusers")


def write_random_adapter(path: str | Path, model: torch.nn.Module, *, seed: int = 0, **options: Any) -> Path:
    """Write an adapter for `model` (the pipeline's transformer or unet) the way PEFT saves one;
    `options` as `write_random_adapters` takes them."""
    return write_random_adapters({path: seed}, model, **options)[0]


def write_random_adapters(
    seeds: Mapping[str | Path, int],
    model: torch.nn.Module,
    *,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    use_rslora: bool = False,
    layout: str = "peft",
    component: str = "transformer",
    std: float = 2.0,
) -> list[Path]:
    """Write one adapter for `model` at each path, its weights drawn from the path's seed.

    PEFT itself injects and saves them, into one copy of the model (a large model's copy takes
    seconds). lora_B is random as well (PEFT initialises it to zero, which changes nothing),
    scaled by `std` so images visibly change. `layout="diffusers"` rewrites the keys as diffusers
    saves them (`<component>.<module>`), with the config in the safetensors header instead of
    adapter_config.json.
    """
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(targets),
        use_rslora=use_rslora,
        init_lora_weights=False,
    )
    base = copy.deepcopy(model)
    if getattr(base, "peft_config", None):
        base.unload_lora()  # a model already serving adapters: start from its base layers
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in base.parameters()):
        base = base.to("cpu", torch.float32)
    peft_model = get_peft_model(base, config)
    written = []
    for path, seed in seeds.items():
        path = Path(path)
        randomize_lora(peft_model, seed=seed, std=std)
        peft_model.save_pretrained(path, safe_serialization=True)
        if layout == "diffusers":
            weights_file = path / "adapter_model.safetensors"
            config_file = path / "adapter_config.json"
            tensors = {
                f"{component}.{key.removeprefix(PEFT_PREFIX)}": tensor
                for key, tensor in load_file(weights_file).items()
            }
            header_config = json.dumps(json.loads(config_file.read_text()))
            metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: header_config}
            save_file(tensors, path / "pytorch_lora_weights.safetensors", metadata=metadata)
            weights_file.unlink()
            config_file.unlink()
        written.append(path)
    return written


def randomize_lora(model: torch.nn.Module, *, seed: int, std: float = 2.0) -> None:
    """Fill every LoRA weight in `model` with seeded noise (lora_B too, which PEFT starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                fan_in = param.shape[1] if param.ndim > 1 else 1
                param.copy_(torch.randn(param.shape, generator=generator) * std / fan_in**0.5)
