"""Fused calls: one adapter at one scale merged into the base weights for a call, then restored.

Unfused, every targeted layer runs two extra matmuls on every step of every image (vLLM-Omni
measured +12% to +30% a forward pass, and graph breaks under `torch.compile`). Merged, the
denoiser runs at the base model's speed. The merge is PEFT's `W + (B @ A) * scaling`, so a fused
image equals PEFT's merged model within rounding. The base weights are never "unmerged" by
subtraction, which is not exact: the first merge that touches a weight keeps a copy of it as
loaded (`BaseWeights`), and every call ends by writing that copy back, so after any sequence of
fused calls every parameter is bit-identical to the model as loaded. A call then costs two passes
over the weights it touches (the merge, one `addmm_`; the restore, one copy), where copying each
weight aside at every call took a third pass and an allocation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

from omni_engine.lora.adapter import LoRAAdapter
from omni_engine.lora.config import peft_scaling

# Device memory that must stay free after the backups are taken; below it they go to host memory.
MIN_FREE_DEVICE_BYTES = 1024**3


def scaling(adapter: LoRAAdapter, module: str, scale: float) -> float:
    """The factor on the module's `B @ A` at `scale`, as PEFT computes it."""
    config = adapter.config
    return peft_scaling(
        config.alpha_for(module), adapter.ranks[module], use_rslora=config.use_rslora, scale=scale
    )


def base_layer(model: torch.nn.Module, module: str) -> torch.nn.Module:
    """The Linear or Conv2d that holds the base weight, whether or not PEFT has wrapped it."""
    layer = model.get_submodule(module)
    return layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer


def add_delta(layer: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, factor: float) -> None:
    """Add what the adapter adds to `layer.weight`, in place: PEFT's `get_delta_weight` for Linear
    and Conv2d. A Linear's is one fused `W += factor * (B @ A)` (one pass over W, one rounding)."""
    weight = layer.weight
    if isinstance(layer, torch.nn.Conv2d):
        a = a.to(weight.device, torch.float32, non_blocking=True)
        b = b.to(weight.device, torch.float32, non_blocking=True)
        if weight.shape[2:4] == (1, 1):
            delta = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * factor
        else:
            delta = F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * factor
        weight.add_(delta.to(weight.dtype))
    else:
        a = a.to(weight.device, weight.dtype, non_blocking=True)
        b = b.to(weight.device, weight.dtype, non_blocking=True)
        weight.addmm_(b, a, alpha=factor)


def _backup_device(weights: list[torch.Tensor]) -> torch.device:
    """The weight's own device while it has room to spare, else (pinned) host memory."""
    device = weights[0].device
    if device.type != "cuda":
        return device
    needed = sum(w.numel() * w.element_size() for w in weights)
    free, _ = torch.cuda.mem_get_info(device)
    return device if free - needed >= MIN_FREE_DEVICE_BYTES else torch.device("cpu")


def _copy(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device == weight.device:
        return weight.detach().clone()
    saved = torch.empty(weight.shape, dtype=weight.dtype, device=device, pin_memory=True)
    return saved.copy_(weight.detach())


class BaseWeights:
    """The model's base weights as loaded, for each module a merge has touched: what every fused
    call restores.

    Memory: one copy of each weight any adapter merged into (on the device while it has 1 GiB to
    spare, else pinned host memory), kept from its first merge; a call's peak is what a copy taken
    for the call alone would be.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._loaded: dict[str, torch.Tensor] = {}

    @contextmanager
    def fused(self, adapter: LoRAAdapter, scale: float) -> Iterator[None]:
        """Within the block, the model's base weights carry `adapter` at `scale`; after it, not a
        bit of it. The model's LoRA layers must be off meanwhile, or the adapter would apply twice.
        """
        layers = {module: base_layer(self.model, module) for module in adapter.modules}
        new = [module for module in layers if module not in self._loaded]
        if new:
            device = _backup_device([layers[module].weight for module in new])
            with torch.no_grad():
                for module in new:
                    self._loaded[module] = _copy(layers[module].weight, device)
        touched: list[str] = []
        try:
            with torch.no_grad():
                for module, layer in layers.items():
                    a = adapter.tensors[f"{module}.lora_A.weight"]
                    b = adapter.tensors[f"{module}.lora_B.weight"]
                    touched.append(module)
                    add_delta(layer, a, b, scaling(adapter, module, scale))
            yield
        finally:
            with torch.no_grad():
                for module in touched:
                    layers[module].weight.copy_(self._loaded[module])
