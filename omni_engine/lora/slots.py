"""Resident slots: `max_loras` weight banks bound, one at a time, into one PEFT adapter built once.

Building PEFT layers (`load_lora_adapter`) allocates and initialises new modules on every load.
Here the model has one PEFT adapter, whose LoRA layers cover every module a resident adapter has
targeted; they are built from a rank-1 zero stub, and built again over the union only when an
adapter targets a module not covered yet (with adapters that target the same modules: once). A
rebuild builds the new layers under the other of two names before it drops the old ones, so a
failed rebuild leaves the model exactly as it was.
A slot is a bank of weights: for each module its adapter targets, two flat buffers sized for
`max_lora_rank` (allocated on first use, in the dtype and on the device PEFT chose for the layer)
and `Parameter`s viewing them. Loading an adapter into a slot is a copy into its buffers, as vLLM's
LoRA slots and PEFT's `hotswap_adapter` do; activating a slot points each LoRA layer's `lora_A` /
`lora_B` weight at the slot's parameters and sets the layer's scaling: dictionary writes, no copy
and no walk over the model's modules.

Two layouts:
- exact (default): a slot's parameters are views at the adapter's true rank, and scaling is PEFT's
  float, so the forward is PEFT's own on tensors of the same shapes and values: images equal PEFT's.
- padded (for `torch.compile`): every parameter is the whole `max_lora_rank` buffer, zero beyond the
  adapter's rank, and each layer's scaling is a 0-d tensor filled in place. Activating any slot at
  any scale then changes no shape, no guarded Python value and no tensor's identity, so a compiled
  denoiser is not recompiled. The zero padding changes the order of summation: images differ from
  PEFT's by rounding.

A module the model's adapter covers but a slot's adapter does not target gets shared idle weights
(rank 0, or a zero rank-1 pair for a Conv2d, which refuses an empty kernel; all zeros at full rank
when padded) at scaling 0: it adds exact zeros.

Memory: per slot, the sum over the modules its adapters targeted of (in_features + out_features) *
max_lora_rank elements (times kernel size for a Conv2d's lora_A).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from omni_engine.lora.adapter import AdapterKey, LoRAAdapter
from omni_engine.lora.config import peft_scaling
from omni_engine.lora.layers import LayerShape
from omni_engine.lora.load_failures import adapter_fault, quiet_rollback

# The model's one PEFT adapter, which slots are bound into, takes these names in turn: a rebuild
# builds under the other name first.
ADAPTER_NAMES = ("omni_lora_0", "omni_lora_1")
SLOT_PREFIX = "omni_slot_"


@dataclass
class _Weights:
    """What a slot binds into one module's LoRA layer."""

    a: torch.nn.Parameter
    b: torch.nn.Parameter
    rank: int = 0  # the adapter's rank in this module (0: adds nothing)
    alpha: float = 0.0
    use_rslora: bool = False

    def scaling(self, scale: float) -> float:
        return peft_scaling(self.alpha, max(self.rank, 1), use_rslora=self.use_rslora, scale=scale)


@dataclass
class _Slot:
    name: str
    adapter: LoRAAdapter | None = None  # what its buffers hold, while they hold all of it
    weights: dict[str, _Weights] = field(default_factory=dict)  # module -> weights, kept for reuse
    targets: frozenset[str] = frozenset()  # the modules `adapter` targets


class SlotBank:
    """`count` adapter slots in `model`, each loadable by copy with any adapter up to `max_rank`."""

    def __init__(
        self,
        model: torch.nn.Module,
        layers: dict[str, LayerShape],
        *,
        count: int,
        max_rank: int,
        padded: bool = False,
    ):
        self._model = model
        self._shapes = layers
        self._max_rank = max_rank
        self._padded = padded
        self._slots = {name: _Slot(name) for name in (f"{SLOT_PREFIX}{i}" for i in range(count))}
        self._name: str | None = None  # the PEFT adapter's name, once built
        self._layers: dict[str, LoraLayer] = {}  # the adapter's coverage: module -> its LoRA layer
        self._buffers: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._idle: dict[str, _Weights] = {}  # module -> the zero weights of slots not targeting it
        self._scales: dict[str, torch.Tensor] = {}  # padded: module -> the layer's scaling tensor
        self._active: tuple[str | None, float] | None = None  # (slot or None: off, scale); None: unknown
        self.builds = 0  # times the PEFT layers were built: what a copy spares

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
        """Copy a checked adapter into the slot, building the layers first if it needs new modules.

        On any failure the slot holds again what it held (copied back from its host copy; where even
        that fails, it holds nothing: `holds` is None), and every other slot is untouched.
        """
        slot = self._slots[name]
        previous = slot.adapter
        slot.adapter = None
        self._active = None  # the slot's weights or the layers change: activate again
        try:
            if not set(adapter.modules) <= set(self._layers):
                self._build(set(self._layers) | set(adapter.modules))
            self._bind(slot, adapter)
        except BaseException:
            if previous is not None:
                try:
                    self._bind(slot, previous)
                except Exception:
                    slot.adapter = None
            raise

    def release(self, name: str, key: AdapterKey) -> None:
        """The adapter `key` no longer needs the slot (if it still holds it): free for another.

        Its buffers stay for the next adapter; a free slot is never activated.
        """
        slot = self._slots[name]
        if slot.adapter is not None and slot.adapter.key == key:
            slot.adapter = None

    def activate(self, name: str | None, scale: float = 1.0) -> None:
        """Run the model with slot `name` at `scale` (None: the base model, LoRA layers off).

        Rebinds weights only when the slot changes; a scale change writes one scaling per layer.
        """
        target = (name, scale if name is not None else 0.0)
        if target == self._active:
            return
        if name is None:
            _set_enabled(self._layers.values(), False)
        else:
            slot = self._slots[name]
            switch = self._active is None or self._active[0] != name
            adapter = self._name
            for module, layer in self._layers.items():
                weights = slot.weights[module] if module in slot.targets else self._idle_weights(module)
                if switch:
                    layer.lora_A[adapter]._parameters["weight"] = weights.a
                    layer.lora_B[adapter]._parameters["weight"] = weights.b
                if self._padded:
                    self._scales[module].fill_(weights.scaling(scale))
                else:
                    layer.scaling[adapter] = weights.scaling(scale)
            if self._active is None or self._active[0] is None:
                _set_enabled(self._layers.values(), True)
        self._active = target

    @contextmanager
    def mixed(
        self, rows: Sequence[tuple[str | None, float]], *, merged: tuple[str, float] | None = None
    ) -> Iterator[None]:
        """Run one call whose prompts each have their own slot and scale (None: the base model).

        Prompt i's rows of every LoRA layer's input get its slot's `B @ A` at its scale, added to
        the base layer's output as PEFT adds one adapter's (forward hooks, the model's LoRA layers
        off): PEFT's product on the same values, its scaling and sum fused into one `addmm_` on a
        Linear, so an image differs from one generated alone only by rounding. A layer may see the
        prompts repeated in whole blocks (classifier-free guidance runs `cat([x] * 2)`).
        Not with padded slots: hooks and changing row sets would recompile a compiled denoiser.

        `merged`, a (slot, scale) of the call, says the caller merged that adapter into the base
        weights for the call (`fusion.BaseWeights`): its own rows then need nothing, and every other row
        gets its delta taken back out, from the same pass over the row as its own delta (the two
        adapters' A stacked; each B then adds its columns of the product at its own scaling). So a
        call whose prompts are mostly one adapter's runs the hooks over the few others only. Those
        rows then round along two paths (the merged weight, less the delta), not only where a matmul
        over fewer rows rounds differently.
        """
        if self._padded:
            raise ValueError("a call mixing adapters cannot run on a compiled denoiser (compile=...)")
        members: dict[tuple[str | None, float], list[int]] = {}  # a row's own (slot, scale) -> rows
        for row, (name, scale) in enumerate(rows):
            own = (name, scale) if name is not None and scale != 0.0 else (None, 0.0)
            if (name, scale) != merged and (own[0] is not None or merged is not None):
                members.setdefault(own, []).append(row)
        groups = {key: _runs(ids) for key, ids in members.items()}
        handles = []
        self._active = None  # the layers' own state changes here: activate again afterwards
        _set_enabled(self._layers.values(), False)
        try:
            for module, layer in self._layers.items():
                taken_out = self._delta(module, *merged, -1.0) if merged is not None else None
                terms = []
                for (name, scale), runs in groups.items():
                    own = self._delta(module, name, scale, 1.0) if name is not None else None
                    term = _Term.of([d for d in (own, taken_out) if d is not None], runs)
                    if term is not None:
                        terms.append(term)
                if terms:
                    conv = layer.lora_A[self._name] if self._shapes[module].kernel else None
                    handles.append(layer.register_forward_hook(_MixedDelta(terms, len(rows), conv)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _delta(self, module: str, name: str, scale: float, sign: float) -> _Delta | None:
        """Slot `name`'s delta in `module` at `sign * scale`, or None if it adds nothing there."""
        slot = self._slots[name]
        if module not in slot.targets:
            return None
        weights = slot.weights[module]
        return _Delta(weights.a, weights.b, sign * weights.scaling(scale))

    # -- building and binding -----------------------------------------------------------------

    def _build(self, modules: set[str]) -> None:
        """Build LoRA layers over `modules` from a rank-1 zero stub, under the name not in use, then
        drop the old layers. The only place the bank touches diffusers' loader; on failure the old
        layers are in place and active as before, and the error is the adapter's fault
        (`adapter_fault`) or the failure itself (out of memory...).
        """
        old = self._name
        new = next(name for name in ADAPTER_NAMES if name != old)
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
            with warnings.catch_warnings(), quiet_rollback(new):
                # The old layers stay until the new ones are built.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                # diffusers' rollback of a failed load deletes that adapter: the failure is raised anyway.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                self._model.load_lora_adapter(stub, prefix=None, adapter_name=new, metadata=config)
            layers = {
                module: layer
                for module, layer in ((m, self._model.get_submodule(m)) for m in modules)
                if isinstance(layer, LoraLayer) and new in layer.lora_A
            }
            if len(layers) != len(modules):
                # A refusal of the adapter's modules, which the caller reports as the adapter's fault.
                raise ValueError(f"building LoRA layers changed {len(layers)} of the {len(modules)} targeted")
        except BaseException as e:
            self._remove(new)
            for layer in self._layers.values():
                layer.set_adapter(old)
            fault = adapter_fault(e, new)  # raises anything that is not the adapter's fault
            if fault is e:
                raise
            raise fault from None
        self._remove(old)
        for module, layer in layers.items():
            layer.set_adapter(new)
            if self._padded:
                device = layer.lora_A[new].weight.device
                scale = self._scales.setdefault(module, torch.zeros((), dtype=torch.float32, device=device))
                layer.scaling[new] = scale
        self._name, self._layers = new, layers

    def _remove(self, name: str | None) -> None:
        """Delete PEFT adapter `name` (if built); with none left, the wrapper layers too."""
        if name in getattr(self._model, "peft_config", {}):
            with warnings.catch_warnings():
                # PEFT warns when the active adapter goes; the caller sets the active one again.
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                self._model.delete_adapters(name)
        if not getattr(self._model, "peft_config", None):
            # No adapter left: remove the wrapper layers too, so the base model runs untouched.
            self._model.unload_lora()

    def _bind(self, slot: _Slot, adapter: LoRAAdapter) -> None:
        """Copy the adapter into the slot's buffers, in one batched copy: no allocation once used."""
        targets, sources = [], []
        with torch.no_grad():
            for module, rank in adapter.ranks.items():
                weights = self._slot_weights(slot, module, rank)
                a, b = weights.a, weights.b
                if self._padded:
                    if weights.rank > rank:  # what the last adapter wrote beyond this rank
                        a[rank : weights.rank].zero_()
                        b[:, rank : weights.rank].zero_()
                    a, b = a[:rank], b[:, :rank]
                targets += [a, b]
                sources += [adapter.tensors[f"{module}.lora_{part}.weight"] for part in "AB"]
                weights.rank = rank
                weights.alpha = adapter.config.alpha_for(module)
                weights.use_rslora = adapter.config.use_rslora
            _copy(targets, sources)
        slot.targets = frozenset(adapter.ranks)
        slot.adapter = adapter

    def _slot_weights(self, slot: _Slot, module: str, rank: int) -> _Weights:
        """The slot's parameters for `module`, made for `rank` (padded: for any rank)."""
        weights = slot.weights.get(module)
        if weights is not None and (self._padded or weights.a.shape[0] == rank):
            return weights
        like = self._layers[module].lora_A[self._name].weight
        key = (slot.name, module)
        if key not in self._buffers:
            shape_a, shape_b = self._shapes[module].lora_shapes(self._max_rank)
            self._buffers[key] = (
                torch.zeros(math.prod(shape_a), dtype=like.dtype, device=like.device),
                torch.zeros(math.prod(shape_b), dtype=like.dtype, device=like.device),
            )
        flat_a, flat_b = self._buffers[key]
        shape_a, shape_b = self._shapes[module].lora_shapes(self._max_rank if self._padded else rank)
        weights = _Weights(
            _parameter(flat_a[: math.prod(shape_a)].view(shape_a)),
            _parameter(flat_b[: math.prod(shape_b)].view(shape_b)),
        )
        slot.weights[module] = weights
        return weights

    def _idle_weights(self, module: str) -> _Weights:
        """Zero weights for a slot whose adapter does not target `module`, shared by every slot."""
        weights = self._idle.get(module)
        if weights is None:
            shape = self._shapes[module]
            like = self._layers[module].lora_A[self._name].weight
            rank = self._max_rank if self._padded else (1 if shape.kernel else 0)
            shape_a, shape_b = shape.lora_shapes(rank)
            weights = _Weights(
                _parameter(torch.zeros(shape_a, dtype=like.dtype, device=like.device)),
                _parameter(torch.zeros(shape_b, dtype=like.dtype, device=like.device)),
            )
            self._idle[module] = weights
        return weights


@dataclass(frozen=True)
class _Delta:
    """One slot's LoRA delta in one layer: `scaling * B @ A`."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


@dataclass(frozen=True)
class _Term:
    """What a mixed call adds to some prompts' rows of one layer: one or more deltas, their A stacked
    so that the rows are read once, `low = x @ [A_1; A_2].T`, then each B times its scaling on its
    own columns of `low`. Rows are runs of consecutive prompts (start, stop)."""

    a: torch.Tensor
    bs: tuple[tuple[torch.Tensor, float], ...]  # (B, scaling), in the order of A's rows
    runs: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, deltas: list[_Delta], runs: tuple[tuple[int, int], ...]) -> _Term | None:
        """The deltas as one term over `runs` (None: nothing to add). Deltas of one slot (its own row
        at one scale, the merged one at another) are one delta at the difference of scalings."""
        by_slot: dict[int, _Delta] = {}
        for delta in deltas:
            seen = by_slot.get(id(delta.a))
            by_slot[id(delta.a)] = (
                delta if seen is None else _Delta(delta.a, delta.b, seen.scaling + delta.scaling)
            )
        kept = list(by_slot.values())
        if not kept:
            return None
        a = kept[0].a if len(kept) == 1 else torch.cat([d.a for d in kept], dim=0)
        return cls(a, tuple((d.b, d.scaling) for d in kept), runs)


class _MixedDelta:
    """A LoRA layer's forward hook in a mixed call: adds each slot's delta to its prompts' rows.

    Rows are taken as slices of consecutive prompts, views of the layer's input and output: no
    gather or scatter copies a row (the engine orders a mixed call's prompts by adapter, so each
    adapter's prompts are one run).
    """

    def __init__(self, terms: list[_Term], prompts: int, conv: torch.nn.Conv2d | None) -> None:
        self._terms = terms
        self._prompts = prompts
        self._conv = conv

    def __call__(self, layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        repeats, rest = divmod(x.shape[0], self._prompts)
        if rest or not repeats:
            raise RuntimeError(
                f"a call mixing adapters over {self._prompts} prompts met a batch of {x.shape[0]} "
                "in a LoRA layer: this pipeline does not keep one row per prompt"
            )
        for term in self._terms:
            # A Linear's delta goes straight into the output's rows when their layout and dtype
            # allow (a term's B matrices share its A's dtype: one dtype a layer's slots).
            in_place = self._conv is None and output.is_contiguous() and output.dtype == term.a.dtype
            for block in range(0, repeats * self._prompts, self._prompts):
                for start, stop in term.runs:
                    rows = slice(block + start, block + stop)
                    selected = x[rows].to(term.a.dtype)
                    if self._conv is not None:
                        low = self._conv._conv_forward(selected, term.a, None)
                    else:
                        low = F.linear(selected, term.a)
                    flat = low.reshape(-1, low.shape[-1]) if in_place else None
                    column = 0
                    for b, scaling in term.bs:
                        part = slice(column, column + b.shape[1])
                        column = part.stop
                        if flat is not None:
                            # out += scaling * low @ B.T in one matmul into a view of the output's
                            # rows, reading this B's columns of `low` in place: no copy, no delta
                            # tensor written and read back.
                            target = output[rows].view(-1, output.shape[-1])
                            target.addmm_(flat[:, part], b.t(), alpha=scaling)
                            continue
                        if self._conv is not None:
                            delta = F.conv2d(low[:, part], b)
                        else:
                            delta = F.linear(low[..., part], b)
                        output[rows].add_((delta * scaling).to(output.dtype))
        return output


def _runs(rows: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted row numbers as runs of consecutive ones: [0, 1, 2, 5] -> ((0, 3), (5, 6))."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return tuple(runs)


def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """One batched copy (from pinned host memory on a GPU: asynchronous, ordered on the stream)."""
    torch._foreach_copy_(targets, sources, non_blocking=True)


def _parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(tensor, requires_grad=False)


def _set_enabled(layers: Iterable[LoraLayer], enabled: bool) -> None:
    """Turn the LoRA layers on or off: PEFT's `enable_adapters` flag without its requires_grad walk
    over every LoRA parameter (which costs milliseconds in a large model and matters only to training)."""
    for layer in layers:
        layer._disable_adapters = not enabled
