"""The three adapter tiers: resident in the model, held in host memory, and disk.

Every adapter the engine holds is in the host tier (`max_cpu_loras`, resident ones included, as
in vLLM); up to `max_loras` of them are also resident in the model, each in one of `max_loras`
slots built once (`slots.SlotBank`): making a held adapter resident is a copy into a slot, and
activating a resident one or changing its scale copies no weights. Both tiers evict least recently
used unpinned adapters. An adapter is read and checked completely before anything held is
touched, so a bad adapter never costs a good one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omni_engine.errors import AdapterError, IncompatibleAdapterError, LoRACapacityError
from omni_engine.lora.adapter import (
    DEFAULT_MAX_ADAPTER_BYTES,
    AdapterKey,
    LoRAAdapter,
    Signature,
    confirm,
    read_adapter,
    signature,
)
from omni_engine.lora.formats import Converter
from omni_engine.lora.layers import adaptable_layers, check_compatible
from omni_engine.lora.load_failures import adapter_fault, log_refusal
from omni_engine.lora.lru import LRUCache
from omni_engine.lora.paths import canonical_roots
from omni_engine.lora.prefetch import Prefetcher
from omni_engine.lora.request import LoRARequest
from omni_engine.lora.slots import SlotBank
from omni_engine.lora.source import AdapterSource


@dataclass
class LoRAStats:
    disk_loads: int = 0
    cpu_hits: int = 0
    gpu_hits: int = 0
    activations: int = 0
    resident_evictions: int = 0
    host_evictions: int = 0
    load_failures: int = 0
    rehashes: int = 0  # held adapters whose racy stat was confirmed by hashing their files again
    prefetched: int = 0  # disk loads whose read was done ahead of the call, off its critical path
    stall_s: float = 0.0  # time calls waited for adapter files (a read, or a prefetch in flight)

    @property
    def evictions(self) -> int:
        return self.resident_evictions + self.host_evictions


@dataclass(frozen=True)
class Activation:
    """What `activate` did: the adapter (None: the base model), where it came from, whether the
    caller must merge it for the call, how long the call waited for its files."""

    adapter: LoRAAdapter | None
    source: AdapterSource | None
    fused: bool = False
    stall_s: float = 0.0


@dataclass(frozen=True)
class LoRAInfo:
    """One held adapter, as `Omni.list_loras()` reports it."""

    name: str
    path: str
    sha256: str  # of the weights file, as sha256sum prints it
    rank: int
    nbytes: int
    resident: bool
    pinned: bool
    lora_int_ids: tuple[int, ...] = field(default=())
    config_sha256: str | None = None  # of adapter_config.json; None when the config is in the weights


class LoRAManager:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        component: str,
        max_loras: int,
        max_cpu_loras: int,
        max_lora_rank: int,
        adapter_roots: list[str] | None,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        pin_host_memory: bool = False,
        converter: Converter | None = None,
        padded_slots: bool = False,
    ) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        if max_cpu_loras < max_loras:
            raise ValueError(
                f"max_cpu_loras ({max_cpu_loras}) counts every held adapter, resident ones included, "
                f"so it must be >= max_loras ({max_loras})"
            )
        if max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {max_lora_rank}")
        self._model = model
        self._component = component
        self._converter = converter
        self._layers = adaptable_layers(model)
        self._max_rank = max_lora_rank
        self._roots = canonical_roots(adapter_roots)
        self._pin_host_memory = pin_host_memory
        self._max_adapter_bytes = max_adapter_bytes
        self._held: LRUCache[AdapterKey, LoRAAdapter] = LRUCache(max_cpu_loras, self._evicted_from_host)
        # Resident adapters and the slot each is in.
        self._resident: LRUCache[AdapterKey, str] = LRUCache(max_loras, self._evicted_from_model)
        self._slots = SlotBank(
            model, self._layers, count=max_loras, max_rank=max_lora_rank, padded=padded_slots
        )
        self._by_path: dict[str, AdapterKey] = {}
        self._ids: dict[int, AdapterKey] = {}
        self._last_activated: AdapterKey | None = None
        self._preloaded: str | None = None  # canonical directory of the engine's lora_path
        self._prefetcher = Prefetcher(self._read, capacity=max_cpu_loras)
        self.stats = LoRAStats()

    # -- public operations -------------------------------------------------------------------

    def activate(self, request: LoRARequest | None, scale: float, *, fuse: bool = False) -> Activation:
        """Make the request's adapter the only active one at `scale` (None or 0.0: the base model).

        With `fuse` (and a scale other than 0.0), the adapter is only held, not made resident, and the
        model's LoRA layers are off: the caller merges it into the weights for the call
        (`fusion.BaseWeights.fused`), as the returned `Activation.fused` says.
        """
        if request is None:
            self._slots.activate(None)
            return Activation(None, None)
        fuse = fuse and scale != 0.0
        stalled_before = self.stats.stall_s
        adapter, source = self._acquire(request, resident=not fuse)
        slot = None if fuse or scale == 0.0 else self._resident.get(adapter.key)
        self._slots.activate(slot, scale)
        if slot is not None and adapter.key != self._last_activated:
            self.stats.activations += 1
            self._last_activated = adapter.key
        return Activation(adapter, source, fuse, self.stats.stall_s - stalled_before)

    def activate_mixed(
        self,
        requests: Sequence[LoRARequest | None],
        scales: Sequence[float],
        *,
        merge: tuple[str, float] | None = None,
    ) -> tuple[list[Activation], AbstractContextManager[None]]:
        """Make every adapter of a mixed call resident at once; one Activation per prompt, and the
        context the call runs in (`SlotBank.mixed`).

        `merge`, a (lora_path, scale) of the call, is the adapter the caller merges into the
        weights for the call: its prompts' Activations say `fused`, and the context takes its
        delta back out of every other prompt's rows.

        The call's adapters stay pinned in the model while the others are loaded, so one never
        evicts another; more distinct adapters than `max_loras` is LoRACapacityError.
        """
        distinct = {r.lora_path: r for r in requests if r is not None}
        if len(distinct) > self._resident.capacity:
            raise LoRACapacityError(
                f"a call mixes {len(distinct)} adapters, more than the {self._resident.capacity} "
                "resident slots (max_loras)"
            )
        pinned_here: list[AdapterKey] = []
        acquired: dict[str, tuple[LoRAAdapter, AdapterSource, float]] = {}
        try:
            for path, request in distinct.items():
                stalled_before = self.stats.stall_s
                adapter, source = self._acquire(request, resident=True)
                acquired[path] = (adapter, source, self.stats.stall_s - stalled_before)
                if not self._resident.is_pinned(adapter.key):
                    self._resident.pin(adapter.key)
                    pinned_here.append(adapter.key)
        finally:
            for key in pinned_here:
                self._resident.unpin(key)
        self._last_activated = None
        self.stats.activations += len(acquired)
        activations, rows = [], []
        for request, scale in zip(requests, scales, strict=True):
            if request is None:
                activations.append(Activation(None, None))
                rows.append((None, 0.0))
                continue
            adapter, source, stall_s = acquired[request.lora_path]
            fused = (request.lora_path, scale) == merge
            activations.append(Activation(adapter, source, fused=fused, stall_s=stall_s))
            rows.append((self._resident.get(adapter.key), scale))
        merged = None
        if merge is not None:
            merged = (self._resident.get(acquired[merge[0]][0].key), merge[1])
        return activations, self._slots.mixed(rows, merged=merged)

    def prefetch(self, requests: Iterable[LoRARequest]) -> None:
        """Read and check these adapters in the background, unless held as they are on disk now.

        A request that cannot be resolved is skipped: the call that needs it reports the error.
        """
        wanted = []
        for request in requests:
            try:
                directory, sig = signature(request.lora_path, self._roots, adapter=request.lora_name)
            except AdapterError:
                continue
            held = self._held_at(directory)
            if held is None or held.signature != sig:
                wanted.append(request)
        if wanted:
            self._prefetcher.want(wanted)

    def close(self) -> None:
        """Stop the background reads."""
        self._prefetcher.close()

    def add(self, request: LoRARequest) -> LoRAAdapter:
        """Read and hold an adapter in host memory without making it resident."""
        adapter, _ = self._acquire(request, resident=False, use=False)
        return adapter

    def preload(self, path: str) -> LoRAAdapter:
        """The adapter given at start: held, resident and pinned in both tiers."""
        adapter, _ = self._acquire(
            LoRARequest(Path(path).name or path, 1, path), resident=True, record_id=False
        )
        self._pin(adapter.key)
        self._preloaded = str(adapter.path)
        return adapter

    def pin(self, lora_int_id: int) -> bool:
        key = self._ids.get(lora_int_id)
        if key is None or key not in self._held:
            return False
        if key not in self._resident:
            adapter = self._held.get(key)
            try:
                self._make_resident(adapter)
            except AdapterError as e:
                log_refusal(adapter.name, str(adapter.path), e)
                raise
        self._pin(key)
        return True

    def remove(self, lora_int_id: int) -> bool:
        key = self._ids.get(lora_int_id)
        if key is None or key not in self._held:
            self._ids.pop(lora_int_id, None)
            return False
        adapter = self._held.get(key)
        if str(adapter.path) == self._preloaded:
            raise ValueError(
                f"lora_int_id {lora_int_id} names the engine's pre-loaded adapter ({adapter.path}), "
                "which stays pinned for the engine's life: it cannot be removed"
            )
        self._drop(key)
        return True

    def list(self) -> list[LoRAInfo]:
        infos = []
        for key in reversed(list(self._held)):  # most recently used first
            adapter = self._held.get(key)
            infos.append(
                LoRAInfo(
                    name=adapter.name,
                    path=str(adapter.path),
                    sha256=adapter.sha256,
                    rank=adapter.max_rank,
                    nbytes=adapter.nbytes,
                    resident=key in self._resident,
                    pinned=self._held.is_pinned(key),
                    lora_int_ids=tuple(sorted(i for i, k in self._ids.items() if k == key)),
                    config_sha256=adapter.config_sha256,
                )
            )
        return infos

    def stats_dict(self) -> dict[str, int | float]:
        return {
            **dataclasses.asdict(self.stats),
            "evictions": self.stats.evictions,
            "resident": len(self._resident),
            "held": len(self._held),
        }

    def held_keys(self) -> tuple[set[str], set[str]]:
        """Canonical paths of resident and of held adapters, for a scheduler deciding what runs next."""
        resident = {key[0] for key in self._resident}
        return resident, {key[0] for key in self._held}

    # -- tiers -------------------------------------------------------------------------------

    def _acquire(
        self, request: LoRARequest, *, resident: bool, use: bool = True, record_id: bool = True
    ) -> tuple[LoRAAdapter, AdapterSource]:
        """Hold the adapter (resident too if `resident`); `use` counts the call's hit in the stats."""
        name = request.lora_name
        try:
            checked_ns = time.time_ns()
            directory, sig = signature(request.lora_path, self._roots, adapter=name)
            held = self._held_at(directory)
            key = held.key if held is not None else None
            confirmed = confirm(held, sig, checked_ns=checked_ns) if held is not None else None
            if confirmed is not None:
                adapter, replacing = confirmed, None
                source = AdapterSource.RESIDENT if key in self._resident else AdapterSource.HOST
            else:
                adapter = self._read_now(request, sig, checked_ns)
                source = AdapterSource.DISK
                # Older content read from this directory makes room for the new when it goes.
                replacing = key if key != adapter.key else None
            _check_room(self._held, adapter.key, replacing, "host slots (max_cpu_loras)")
            name = None
            if resident and adapter.key not in self._resident:
                _check_room(self._resident, adapter.key, replacing, "resident slots (max_loras)")
                # Before anything is dropped: a failure changes nothing.
                name = self._inject(adapter, replacing)
        except AdapterError as e:
            self.stats.load_failures += 1
            log_refusal(request.lora_name, request.lora_path, e)
            raise
        except LoRACapacityError:
            self.stats.load_failures += 1
            raise

        pinned = False
        if source == AdapterSource.DISK:
            pinned = self._admit(adapter)
            self.stats.disk_loads += 1
        elif source == AdapterSource.HOST and use:
            self.stats.cpu_hits += 1
        elif source == AdapterSource.RESIDENT and use:
            self.stats.gpu_hits += 1
        # Re-hashed: the same content, with a later check time.
        if source != AdapterSource.DISK and adapter is not held:
            self._held.put(adapter.key, adapter)
            self.stats.rehashes += 1
        if name is not None:
            self._place(adapter.key, name)
        if pinned:
            self._pin(adapter.key)
        self._held.touch(adapter.key)
        if adapter.key in self._resident:
            self._resident.touch(adapter.key)
        if record_id:
            self._ids[request.lora_int_id] = adapter.key
        return adapter, source

    def _read_now(self, request: LoRARequest, sig: Signature, checked_ns: int) -> LoRAAdapter:
        """The adapter as it is on disk now: prefetched if a read was started and is still current."""
        started = time.perf_counter()
        try:
            ahead = self._prefetcher.take(request.lora_path)
            if ahead is not None:
                try:
                    adapter = ahead.result()
                except Exception:
                    adapter = None  # read again below, so the error (if any) is today's
                current = confirm(adapter, sig, checked_ns=checked_ns) if adapter is not None else None
                if current is not None:
                    self.stats.prefetched += 1
                    return current
            return self._read(request)
        finally:
            self.stats.stall_s += time.perf_counter() - started

    def _held_at(self, directory: Path) -> LoRAAdapter | None:
        """The adapter held for this canonical directory, if any (whatever its files hold now)."""
        key = self._by_path.get(str(directory))
        return self._held.get(key) if key is not None else None

    def _read(self, request: LoRARequest) -> LoRAAdapter:
        adapter = read_adapter(
            request.lora_path,
            name=request.lora_name,
            component=self._component,
            roots=self._roots,
            max_bytes=self._max_adapter_bytes,
            converter=self._converter,
        )
        check_compatible(adapter, self._layers, max_rank=self._max_rank)
        return dataclasses.replace(adapter, tensors=self._host_copies(adapter.tensors))

    def _host_copies(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights as the host tier holds them: in their layer's dtype, as PEFT and the slots
        hold them (a float32 file for a bfloat16 model would otherwise hold, and copy in, twice
        the bytes); pinned where the model is on CUDA, so they copy in without a staging buffer."""
        held = {}
        for key, tensor in tensors.items():
            dtype = self._layers[key.rsplit(".", 2)[0]].dtype
            dtype = dtype if dtype.is_floating_point else tensor.dtype  # as PEFT: never cast to ints
            if self._pin_host_memory:
                held[key] = torch.empty(tensor.shape, dtype=dtype, pin_memory=True).copy_(tensor)
            else:
                held[key] = tensor.to(dtype)
        return held

    def _admit(self, adapter: LoRAAdapter) -> bool:
        """Hold a freshly read adapter, dropping older content of its directory; True if it was pinned."""
        path = str(adapter.path)
        previous = self._by_path.get(path)
        pinned = False
        if previous is not None and previous != adapter.key:
            pinned = self._held.is_pinned(previous)
            self._redirect_ids(previous, adapter.key)
            self._drop(previous)
        if adapter.key in self._held:  # same content, files touched: keep it, refresh what we saw
            pinned = pinned or self._held.is_pinned(adapter.key)
        self._held.put(adapter.key, adapter)
        self._by_path[path] = adapter.key
        return pinned

    def _make_resident(self, adapter: LoRAAdapter) -> None:
        _check_room(self._resident, adapter.key, None, "resident slots (max_loras)")
        self._place(adapter.key, self._inject(adapter))

    def _place(self, key: AdapterKey, name: str) -> None:
        """Record the adapter just loaded into slot `name`, evicting the one it displaced (unless a
        drop or a host eviction has removed that one already)."""
        for other in self._resident:
            if other != key and self._resident.get(other) == name:
                self._resident.remove(other)
                self.stats.resident_evictions += 1
        self._resident.put(key, name)  # never evicts: the slot was free or is freed above

    def _pin(self, key: AdapterKey) -> None:
        self._held.pin(key)
        if key in self._resident:
            self._resident.pin(key)

    def _drop(self, key: AdapterKey) -> None:
        name = self._resident.remove(key)
        if name is not None:
            self._slots.release(name, key)
        adapter = self._held.remove(key)
        self._forget(key, adapter)

    def _forget(self, key: AdapterKey, adapter: LoRAAdapter | None) -> None:
        if adapter is not None and self._by_path.get(str(adapter.path)) == key:
            del self._by_path[str(adapter.path)]
        for lora_id in [i for i, k in self._ids.items() if k == key]:
            del self._ids[lora_id]

    def _redirect_ids(self, old: AdapterKey, new: AdapterKey) -> None:
        for lora_id, key in self._ids.items():
            if key == old:
                self._ids[lora_id] = new

    def _evicted_from_model(self, key: AdapterKey, name: str) -> None:
        self.stats.resident_evictions += 1
        self._slots.release(name, key)

    def _evicted_from_host(self, key: AdapterKey, adapter: LoRAAdapter) -> None:
        self.stats.host_evictions += 1
        name = self._resident.remove(key)
        if name is not None:
            self._slots.release(name, key)
        self._forget(key, adapter)

    # -- the model ---------------------------------------------------------------------------

    def _inject(self, adapter: LoRAAdapter, replacing: AdapterKey | None = None) -> str:
        """Copy the adapter into a slot: a free one, else the slot of the adapter that makes room
        (`replacing` if resident, else the least recently used), which `_place` then evicts. A
        failure leaves every resident adapter in its slot (`SlotBank.load` copies it back)."""
        name = self._free_slot(replacing)
        try:
            self._slots.load(name, adapter)
        except BaseException as e:  # an interrupt too: never leave a half-loaded slot in use
            for key in list(self._resident):
                if self._slots.holds(self._resident.get(key)) != key:
                    # Its slot could not be restored: it stays held in host memory only.
                    self._resident.remove(key)
                    self.stats.resident_evictions += 1
            if isinstance(e, AdapterError):
                raise
            fault = adapter_fault(e)  # anything else (out of memory...) is raised as it is
            raise IncompatibleAdapterError(adapter.name, f"loading into the model failed: {fault}") from fault
        return name

    def _free_slot(self, replacing: AdapterKey | None) -> str:
        """A slot no resident adapter is in, or the slot of the adapter that must make room."""
        used = {self._resident.get(key) for key in self._resident}
        for name in self._slots.names:
            if name not in used:
                return name
        victim = replacing if replacing in self._resident else self._resident.oldest_unpinned()
        if victim is None:  # _check_room refuses this before any change
            raise LoRACapacityError(f"all {self._resident.capacity} resident slots (max_loras) are pinned")
        return self._resident.get(victim)


def _check_room(cache: LRUCache, key: AdapterKey, replacing: AdapterKey | None, what: str) -> None:
    """Refuse before any change when every slot is pinned (an entry about to be replaced frees one)."""
    if not (cache.has_room_for(key) or (replacing is not None and replacing in cache)):
        raise LoRACapacityError(f"all {cache.capacity} {what} are pinned")
