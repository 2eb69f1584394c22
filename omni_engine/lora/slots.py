"""Resident slots: `max_loras` PEFT adapters built once, that held adapters are copied into.

Building PEFT layers (`load_lora_adapter`) allocates and initialises new modules on every load;
a slot's layers are built once, and loading an adapter into the slot afterwards is a copy of its
weights into buffers the slot owns, as vLLM's LoRA slots and PEFT's `hotswap_adapter` do.

A slot's PEFT layers exist on a set of modules (its coverage). They are built from a rank-1 zero
stub over the modules an adapter needs, and built again over the union only when an adapter
targets a module the slot does not cover yet: with adapters that target the same modules, once
per slot. Each (slot, module) owns two flat buffers sized for `max_lora_rank`, allocated on first
use in the dtype and on the device PEFT chose for the layer. Loading copies lora_A and lora_B into
contiguous views of them at the adapter's true rank and hands those views to the layer's own
lora_A/lora_B as their weights, with its r, lora_alpha and use_rslora: the forward is PEFT's own,
on tensors of the same shapes and values, so images equal PEFT's. A module the slot covers but the
adapter does not target gets an empty rank (a Conv2d, which refuses an empty kernel, a zero rank-1
pair) at lora_alpha 0: it adds exact zeros.

Memory: per slot, the sum over covered modules of (in_features + out_features) * max_lora_rank
elements (times kernel size for a Conv2d's lora_A).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer

from omni_engine.lora.adapter import AdapterKey, LoRAAdapter
from omni_engine.lora.config import peft_scaling
from omni_engine.lora.layers import LayerShape
from omni_engine.lora.load_failures import quiet_rollback

SLOT_PREFIX = "omni_slot_"


@dataclass
class _Slot:
    name: str
    layers: dict[str, LoraLayer] = field(default_factory=dict)  # its coverage: module -> PEFT layer
    adapter: LoRAAdapter | None = None  # what its buffers hold, while they hold all of it


class SlotBank:
    """`count` adapter slots in `model`, each loadable by copy with any adapter up to `max_rank`."""

    def __init__(self, model: torch.nn.Module, layers: dict[str, LayerShape], *, count: int, max_rank: int):
        self._model = model
        self._shapes = layers
        self._max_rank = max_rank
        self._slots = {name: _Slot(name) for name in (f"{SLOT_PREFIX}{i}" for i in range(count))}
        self._buffers: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.builds = 0  # times a slot's PEFT layers were built: what a copy spares

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def holds(self, name: str) -> AdapterKey | None:
        adapter = self._slots[name].adapter
        return adapter.key if adapter is not None else None

    def buffers(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The slot's flat (lora_A, lora_B) buffers by module, for tests and memory accounting."""
        return {module: pair for (slot, module), pair in self._buffers.items() if slot == name}

    def load(self, name: str, adapter: LoRAAdapter) -> None:
        """Copy a checked adapter into the slot, building its layers first if it lacks some module.

        On any failure the slot holds again what it held (built again and copied back from its host
        copy if it had to be rebuilt); where even that fails, it holds nothing (`holds` is None).
        """
        slot = self._slots[name]
        previous, coverage = slot.adapter, set(slot.layers)
        slot.adapter = None
        try:
            if not set(adapter.modules) <= coverage:
                self._build(slot, coverage | set(adapter.modules))
            self._allocate(slot)
            self._bind(slot, adapter)
        except BaseException:
            if previous is not None:
                try:
                    if set(slot.layers) != coverage:
                        self._build(slot, coverage)
                    self._bind(slot, previous)
                except Exception:
                    slot.adapter = None
            raise

    def release(self, name: str, key: AdapterKey) -> None:
        """The adapter `key` no longer needs the slot (if it still holds it): free for another.

        Its buffers and layers stay for the next adapter; a free slot is never activated.
        """
        slot = self._slots[name]
        if slot.adapter is not None and slot.adapter.key == key:
            slot.adapter = None

    # -- building and binding -----------------------------------------------------------------

    def _build(self, slot: _Slot, modules: set[str]) -> None:
        """(Re)build the slot's PEFT layers over `modules`, from a rank-1 zero stub.

        The only place a slot touches diffusers' loader; on failure the slot has no layers.
        """
        self._delete(slot)
        stub: dict[str, torch.Tensor] = {}
        for module in modules:
            shape_a, shape_b = self._shapes[module].lora_shapes(1)
            stub[f"{module}.lora_A.weight"] = torch.zeros(shape_a)
            stub[f"{module}.lora_B.weight"] = torch.zeros(shape_b)
        config = {
            "r": 1,
            "lora_alpha": 1,
            "use_rslora": False,
            # A string is matched in full by PEFT (see AdapterConfig.peft_kwargs).
            "target_modules": "|".join(re.escape(module) for module in sorted(modules)),
        }
        self.builds += 1
        try:
            with warnings.catch_warnings(), quiet_rollback(slot.name):
                # Several slots in one model is the point of the resident tier.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                # diffusers' rollback of a failed load deletes that adapter: the failure is raised anyway.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                self._model.load_lora_adapter(stub, prefix=None, adapter_name=slot.name, metadata=config)
        except BaseException:
            self._delete(slot)
            raise
        layers = {
            module: layer
            for module, layer in ((m, self._model.get_submodule(m)) for m in modules)
            if isinstance(layer, LoraLayer) and slot.name in layer.lora_A
        }
        if len(layers) != len(modules):
            self._delete(slot)
            # A refusal of the adapter's modules, which the caller reports as the adapter's fault.
            raise ValueError(
                f"building {slot.name} changed {len(layers)} of the {len(modules)} layers it targets"
            )
        slot.layers = layers

    def _delete(self, slot: _Slot) -> None:
        slot.layers = {}
        if slot.name in getattr(self._model, "peft_config", {}):
            with warnings.catch_warnings():
                # PEFT warns when the active adapter goes; the manager sets the next one explicitly.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                self._model.delete_adapters(slot.name)
        if not getattr(self._model, "peft_config", None):
            # No slot left: remove the wrapper layers too, so the base model runs untouched.
            self._model.unload_lora()

    def _allocate(self, slot: _Slot) -> None:
        """Buffers at max_lora_rank for every covered module that has none, like PEFT's weights."""
        for module, layer in slot.layers.items():
            if (slot.name, module) in self._buffers:
                continue
            like = layer.lora_A[slot.name].weight
            shape_a, shape_b = self._shapes[module].lora_shapes(self._max_rank)
            self._buffers[(slot.name, module)] = (
                torch.zeros(math.prod(shape_a), dtype=like.dtype, device=like.device),
                torch.zeros(math.prod(shape_b), dtype=like.dtype, device=like.device),
            )

    def _bind(self, slot: _Slot, adapter: LoRAAdapter) -> None:
        """Copy the adapter into the slot's buffers and make them its layers' weights: no allocation."""
        with torch.no_grad():
            for module, layer in slot.layers.items():
                shape = self._shapes[module]
                rank = adapter.ranks.get(module)
                flat_a, flat_b = self._buffers[(slot.name, module)]
                shape_a, shape_b = shape.lora_shapes(rank if rank is not None else _idle_rank(shape))
                a = flat_a[: math.prod(shape_a)].view(shape_a)
                b = flat_b[: math.prod(shape_b)].view(shape_b)
                if rank is None:  # covered, not targeted: adds exact zeros
                    a.zero_()
                    b.zero_()
                    alpha = 0.0
                else:
                    a.copy_(adapter.tensors[f"{module}.lora_A.weight"], non_blocking=True)
                    b.copy_(adapter.tensors[f"{module}.lora_B.weight"], non_blocking=True)
                    alpha = adapter.config.alpha_for(module)
                _set_weight(layer.lora_A[slot.name], a)
                _set_weight(layer.lora_B[slot.name], b)
                # What PEFT's update_layer records, so set_scale computes scale * alpha / r as PEFT does.
                r = max(a.shape[0], 1)
                layer.r[slot.name] = r
                layer.lora_alpha[slot.name] = alpha
                layer.use_rslora[slot.name] = adapter.config.use_rslora
                layer.scaling[slot.name] = peft_scaling(alpha, r, use_rslora=adapter.config.use_rslora)
        slot.adapter = adapter


def _idle_rank(shape: LayerShape) -> int:
    """The rank of a covered module the adapter does not target: none (a Conv2d needs one, of zeros)."""
    return 1 if shape.kernel else 0


def _set_weight(module: torch.nn.Module, weight: torch.Tensor) -> None:
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    if isinstance(module, torch.nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, torch.nn.Conv2d):
        module.out_channels, module.in_channels = weight.shape[:2]
