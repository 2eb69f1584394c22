"""`Omni`: a diffusers pipeline with an LRU-cached LoRA manager, behind vLLM-Omni's offline API."""

from __future__ import annotations

import contextlib
import math
import platform
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from omni_engine.compiling import check_compile_backend, check_kernel_compiler
from omni_engine.defaults import DEFAULT_MAX_CPU_LORAS, DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS
from omni_engine.lora.adapter import DEFAULT_MAX_ADAPTER_BYTES, LoRAAdapter
from omni_engine.lora.fuse_mode import FuseMode
from omni_engine.lora.fusion import BaseWeights
from omni_engine.lora.manager import LoRAInfo, LoRAManager
from omni_engine.lora.request import LoRARequest
from omni_engine.models.loader import load_model, resolve_device
from omni_engine.models.presets import DEFAULT_MODEL
from omni_engine.outputs import OmniRequestOutput
from producer.defaults import MAX_SEED

# Under fuse="auto", a call with at least this many images x steps merges its adapter: merging
# and restoring cost about what the unfused LoRA layers add to this many image-steps
# (bench/tax.py; the rule depends only on the call itself, never on what it was grouped with).
FUSE_MIN_IMAGE_STEPS = 2
VERSIONED_PACKAGES = ("omni-batch", "torch", "diffusers", "peft", "transformers")


def library_versions() -> dict[str, str]:
    found = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


class Omni:
    """Generates images with one diffusion model and many LoRA adapters.

    Adapters live in three tiers (resident in the model, held in host memory, disk) and are
    identified by content, so the same directory is never loaded twice while it is cached.
    A call's adapter is applied by switching the model's active adapter and its scale, which
    copies no weights; `lora_scale=0.0` runs the base model exactly.

    Resident adapters occupy `max_loras` slots whose LoRA layers are built once; a held adapter
    becomes resident by a copy into a slot. With `compile` (a torch.compile backend, such as
    "inductor"), the denoiser is compiled once; slots are then padded to `max_lora_rank` so that
    switching adapters, ranks and scales never recompiles it (images then differ from the
    uncompiled engine's by rounding: docs/reliability.md). A slot reserves `(in_features + out_features) *
    max_lora_rank` elements of the model's dtype for each layer an adapter has targeted in it
    (allocated on first use), so memory grows with max_loras x max_lora_rank: lower
    `max_lora_rank` to the largest rank your adapters use.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        lora_path: str | None = None,
        max_loras: int = DEFAULT_MAX_LORAS,
        max_cpu_loras: int = DEFAULT_MAX_CPU_LORAS,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        adapter_roots: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        fuse: FuseMode | str = FuseMode.AUTO,
        compile: str | None = None,
    ) -> None:
        try:
            self.fuse = FuseMode(fuse)
        except ValueError:
            raise ValueError(f"fuse must be one of {[m.value for m in FuseMode]}, got {fuse!r}") from None
        self.compile = check_compile_backend(compile)
        self.device, self.dtype = resolve_device(device, dtype)
        check_kernel_compiler(self.compile, self.device)
        self._model = load_model(model, device=self.device, dtype=self.dtype)
        self._base = BaseWeights(self._model.denoiser)
        self._lora = LoRAManager(
            self._model.denoiser,
            component=self._model.denoiser_name,
            max_loras=max_loras,
            max_cpu_loras=max_cpu_loras,
            max_lora_rank=max_lora_rank,
            adapter_roots=list(adapter_roots) if adapter_roots is not None else None,
            max_adapter_bytes=max_adapter_bytes,
            pin_host_memory=self.device.type == "cuda",
            converter=self._model.converter,
            padded_slots=self.compile is not None,
        )
        if self.compile is not None:
            # Compiled on its first call; the padded slots keep every later switch off the guards.
            self._model.denoiser.compile(backend=self.compile)
        self._lock = threading.RLock()
        self._versions = library_versions()
        if lora_path is not None:
            self._lora.preload(lora_path)

    @property
    def pipeline(self) -> Any:
        return self._model.pipeline

    @property
    def model_id(self) -> str:
        return self._model.model_id

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this for the model."""
        return self._model.size_multiple

    def generate(
        self,
        prompt: str | list[str],
        *,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
        lora_scale: float | list[float] = 1.0,
        seed: int | list[int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
    ) -> list[OmniRequestOutput]:
        """One output per prompt, all in one pipeline call.

        `seed` may be one int (prompt i uses seed + i) or one per prompt; omitted, a random seed
        is drawn and recorded. A prompt's image depends only on its own seed.
        `lora_request` and `lora_scale` may also be given per prompt: a call that mixes adapters
        (up to `max_loras` of them) runs them unfused, each on its own prompts' rows.
        """
        # 1. Check inputs.
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"prompt must be a non-empty string or list of them, got {prompt!r}")
        seeds = self._seeds(seed, len(prompts))
        requests = _per_prompt("lora_request", lora_request, len(prompts))
        scales = _per_prompt("lora_scale", lora_scale, len(prompts))
        for scale in scales:
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
                raise ValueError(f"lora_scale must be a finite number, got {scale!r}")
        scales = [float(scale) for scale in scales]
        for request in requests:
            if request is not None and not isinstance(request, LoRARequest):
                raise TypeError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        # Each prompt's (adapter path, scale): a call with more than one mixes adapters.
        keys = [(r.lora_path if r is not None else None, s) for r, s in zip(requests, scales, strict=True)]
        mixed = len(set(keys)) > 1
        defaults = self._model.defaults
        height = self._check_size("height", height if height is not None else defaults.height)
        width = self._check_size("width", width if width is not None else defaults.width)
        steps = num_inference_steps if num_inference_steps is not None else defaults.steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
        guidance = guidance_scale if guidance_scale is not None else defaults.guidance_scale
        if guidance is not None and (not isinstance(guidance, int | float) or not math.isfinite(guidance)):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance!r}")

        merge = self._mixed_merge(keys, steps) if mixed else None
        # A mixed call runs its prompts grouped by adapter (the merged one's first), so that each
        # adapter's rows are one slice of the batch; the outputs come back in the caller's order.
        order = _grouped_order(keys, merge) if mixed else None
        if order is not None:
            prompts, seeds, requests, scales = (
                [values[i] for i in order] for values in (prompts, seeds, requests, scales)
            )

        call: dict[str, Any] = {"prompt": prompts, "output_type": "pil"}
        for key, value in (
            ("num_inference_steps", steps),
            ("guidance_scale", guidance),
            ("height", height),
            ("width", width),
            ("negative_prompt", [negative_prompt] * len(prompts) if negative_prompt is not None else None),
        ):
            if value is not None:
                call[key] = value

        with self._lock, contextlib.ExitStack() as applied:
            # 2. Activate the adapter (a switch if resident, a load otherwise), or merge it into
            #    the weights for this call (fused: restored exactly when the call ends); or, for
            #    a mixed call, make every adapter resident and route each prompt to its own.
            started = time.perf_counter()
            if mixed:
                activations, context = self._lora.activate_mixed(requests, scales, merge=merge)
                applied.enter_context(context)
                main = next((a for a in activations if a.fused), None)
                if main is not None:
                    applied.enter_context(self._base.fused(main.adapter, merge[1]))
            else:
                activation = self._lora.activate(
                    requests[0], scales[0], fuse=self._fuses(len(prompts), steps)
                )
                if activation.fused:
                    applied.enter_context(self._base.fused(activation.adapter, scales[0]))
                activations = [activation] * len(prompts)
            adapter_s = time.perf_counter() - started

            # 3. Denoise, one generator per prompt so batching never changes an image.
            generators = [torch.Generator(self._generator_device()).manual_seed(s) for s in seeds]
            started = time.perf_counter()
            images = self._model.pipeline(generator=generators, **call).images
            generate_s = time.perf_counter() - started

        shared = {
            "model": self._model.model_id,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "height": height,
            "width": width,
            "negative_prompt": negative_prompt,
            "batch_size": len(prompts),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "versions": dict(self._versions),
        }
        outputs = [
            OmniRequestOutput(
                prompt=p,
                images=[image],
                metadata={
                    "seed": s,
                    **shared,
                    "lora": _lora_record(request, activation.adapter),
                    "lora_scale": scale,
                    "adapter_source": activation.source,
                    "fused": activation.fused,
                    "mixed": mixed,
                    "timings": {
                        "adapter_s": adapter_s,
                        "stall_s": activation.stall_s,
                        "generate_s": generate_s,
                    },
                },
            )
            for p, s, image, request, scale, activation in zip(
                prompts, seeds, images, requests, scales, activations, strict=True
            )
        ]
        if order is None:
            return outputs
        in_callers_order: list[OmniRequestOutput] = [None] * len(outputs)  # type: ignore[list-item]
        for position, index in enumerate(order):
            in_callers_order[index] = outputs[position]
        return in_callers_order

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read, check and hold an adapter in host memory, ready for a fast first use."""
        with self._lock:
            self._lora.add(lora_request)
            return True

    def prefetch_loras(self, lora_requests: Iterable[LoRARequest]) -> None:
        """Start reading and checking adapters that calls will soon need, on a background thread.

        Returns at once. A later call for one of them waits for no disk read (or only for the
        rest of one in flight), and reports `adapter_source="disk"` since its files were read.
        """
        with self._lock:
            self._lora.prefetch(lora_requests)

    def close(self) -> None:
        """Stop background reads. The engine stays usable; reads are then made by each call."""
        with self._lock:
            self._lora.close()

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drop a held adapter (False if the id names none). The pre-loaded `lora_path` is refused:
        ValueError, rather than quietly losing the pin it was given at start."""
        with self._lock:
            return self._lora.remove(lora_int_id)

    def pin_lora(self, lora_int_id: int) -> bool:
        """Keep an adapter resident and held until removed; False if the id names no held adapter."""
        with self._lock:
            return self._lora.pin(lora_int_id)

    def list_loras(self) -> list[LoRAInfo]:
        with self._lock:
            return self._lora.list()

    def lora_stats(self) -> dict[str, int | float]:
        with self._lock:
            return self._lora.stats_dict()

    def held_adapters(self) -> tuple[set[str], set[str]]:
        """Canonical paths of (resident, held) adapters: what a scheduler needs to order work."""
        with self._lock:
            return self._lora.held_keys()

    def _fuses(self, images: int, steps: int | None) -> bool:
        """AUTO: merge when the call has enough image-steps to repay the merge (docs/performance.md)."""
        if self.fuse is FuseMode.AUTO:
            return images * (steps or 1) >= FUSE_MIN_IMAGE_STEPS
        return self.fuse is FuseMode.ALWAYS

    def _mixed_merge(
        self, keys: Sequence[tuple[str | None, float]], steps: int | None
    ) -> tuple[str, float] | None:
        """The (lora_path, scale) a mixed call merges into the weights, or None: its largest
        adapter, when the hooks then do less work (each other adapter's row two deltas: its own,
        and the merged one's taken out; each base row one; ranks taken as equal) and the merge pays
        as a fused call's would."""
        calls = Counter(key for key in keys if key[0] is not None and key[1] != 0.0)
        if not calls:
            return None
        main, own = calls.most_common(1)[0]
        with_adapter = sum(calls.values())
        hooked = 2 * (with_adapter - own) + (len(keys) - with_adapter)
        return main if hooked < with_adapter and self._fuses(own, steps) else None

    def _generator_device(self) -> torch.device:
        """The engine's own device, index and all (a generator on "cuda" is on cuda:0, whatever the
        engine's); MPS draws on the CPU."""
        return torch.device("cpu") if self.device.type == "mps" else self.device

    def _check_size(self, field: str, value: int | None) -> int | None:
        if value is None:
            return None
        multiple = self._model.size_multiple
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            raise ValueError(
                f"{field} must be a positive multiple of {multiple} for this model, got {value!r}"
            )
        return value

    @staticmethod
    def _seeds(seed: int | list[int] | None, count: int) -> list[int]:
        if seed is None:
            return [secrets.randbelow(MAX_SEED + 1) for _ in range(count)]
        if isinstance(seed, list):
            if len(seed) != count:
                raise ValueError(f"seed has {len(seed)} values for {count} prompts")
            seeds = seed
        else:
            seeds = [seed + i for i in range(count)]
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
                raise ValueError(f"seed must be an int in 0..2**63-1, got {s!r}")
        return seeds


def _per_prompt(name: str, value: Any, count: int) -> list[Any]:
    """One value for every prompt, or a list with one per prompt."""
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name} has {len(value)} values for {count} prompts")
    return value


def _lora_record(request: LoRARequest | None, adapter: LoRAAdapter | None) -> dict[str, Any] | None:
    """The adapter a prompt ran with, as its output's metadata names it."""
    if request is None or adapter is None:
        return None
    return {
        "name": request.lora_name,
        "lora_int_id": request.lora_int_id,
        "path": str(adapter.path),
        "sha256": adapter.sha256,
        "config_sha256": adapter.config_sha256,
        "rank": adapter.max_rank,
    }


def _grouped_order(keys: Sequence[tuple[str | None, float]], merge: tuple[str, float] | None) -> list[int]:
    """Prompt indices ordered by (adapter path, scale), the merged one's first, then as first seen."""
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    return sorted(range(len(keys)), key=lambda i: (keys[i] != merge, first[keys[i]], i))
