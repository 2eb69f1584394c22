"""What a model offers LoRA: its adaptable layers and their shapes, and whether an adapter fits them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_engine.errors import IncompatibleAdapterError
from omni_engine.lora.adapter import LoRAAdapter


@dataclass(frozen=True)
class LayerShape:
    """lora_A and lora_B shapes for a given rank follow from the layer's kind and sizes; `dtype` is
    its weight's, the one PEFT gives the LoRA weights it adds to the layer."""

    in_features: int
    out_features: int
    dtype: torch.dtype
    kernel: tuple[int, ...] = ()

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self.kernel:
            return (rank, self.in_features, *self.kernel), (self.out_features, rank, *(1,) * len(self.kernel))
        return (rank, self.in_features), (self.out_features, rank)


def adaptable_layers(model: torch.nn.Module) -> dict[str, LayerShape]:
    """Linear and Conv2d layers by module path. Call before any adapter wraps them."""
    layers: dict[str, LayerShape] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[name] = LayerShape(module.in_features, module.out_features, module.weight.dtype)
        elif isinstance(module, torch.nn.Conv2d) and module.groups == 1:
            layers[name] = LayerShape(
                module.in_channels, module.out_channels, module.weight.dtype, tuple(module.kernel_size)
            )
    return layers


def check_compatible(adapter: LoRAAdapter, layers: dict[str, LayerShape], *, max_rank: int) -> None:
    """Every module the adapter names must exist with matching shapes, at an allowed rank."""
    if not adapter.ranks:
        raise IncompatibleAdapterError(
            adapter.name, "has no LoRA weights: it applies to no layer of the model"
        )
    if adapter.max_rank > max_rank:
        raise IncompatibleAdapterError(
            adapter.name, f"rank {adapter.max_rank} is above max_lora_rank={max_rank}"
        )
    absent, mismatched = [], []
    for module, rank in adapter.ranks.items():
        layer = layers.get(module)
        if layer is None:
            absent.append(module)
            continue
        want_a, want_b = layer.lora_shapes(rank)
        got_a = tuple(adapter.tensors[f"{module}.lora_A.weight"].shape)
        got_b = tuple(adapter.tensors[f"{module}.lora_B.weight"].shape)
        if (got_a, got_b) != (want_a, want_b):
            mismatched.append(
                f"{module} (lora_A {list(got_a)}, lora_B {list(got_b)}; model needs "
                f"{list(want_a)}, {list(want_b)})"
            )
    problems = []
    if absent:
        what = "applies to no layer of the model" if len(absent) == len(adapter.ranks) else "targets"
        problems.append(
            f"{what}: {len(absent)} module(s) absent from the model, e.g. {', '.join(absent[:3])}"
        )
    if mismatched:
        problems.append(f"shape mismatch in {len(mismatched)} module(s): {'; '.join(mismatched[:3])}")
    if problems:
        raise IncompatibleAdapterError(adapter.name, "; ".join(problems))
