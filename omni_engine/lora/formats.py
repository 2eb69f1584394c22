"""The key layouts an adapter's weights file may use, mapped to one: `<module>.lora_A.weight`.

diffusers and PEFT write the same LoRA under different names: PEFT's `save_pretrained` prefixes
`base_model.model.`, a pipeline's `save_lora_weights` the component (`transformer.`, `unet.`), a
model's `save_lora_adapter` nothing at all. The module paths are relative to the denoiser in
all three. kohya/A1111 files (`lora_unet_..._lora_down.weight`, `.alpha`) are converted first, in
memory, by diffusers' own converter for the model's pipeline class. A file whose config is nowhere
(no adapter_config.json, no header metadata) gets diffusers' own default, alpha = r for every
module, so it computes what diffusers computes.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from omni_engine.errors import IncompatibleAdapterError, InvalidAdapterError

PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# Pipeline parts a diffusers file may carry weights for; only the model's denoiser is adapted.
PIPELINE_PARTS = ("transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_ENCODER_REFUSAL = (
    "text-encoder LoRA is not supported: the engine keeps, switches and fuses adapters in the "
    "denoiser only, and applying just the denoiser part would silently give another image than "
    "the adapter's own"
)


# kohya's sd-scripts (and A1111) name a LoRA pair `<prefix>_<module_with_underscores>.lora_down.weight`
# / `.lora_up.weight`, with the module's alpha in `.alpha`.
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")
KOHYA_PREFIXES = ("lora_unet_", "lora_te", "lora_transformer_")


@dataclass(frozen=True)
class Converter:
    """diffusers' reader of other LoRA layouts for one pipeline class (`lora_state_dict`), in memory."""

    pipeline: str  # the class name, for messages
    read: Callable[[dict[str, torch.Tensor]], Any]


def converter_for(pipeline: Any, denoiser: torch.nn.Module) -> Converter | None:
    """The pipeline class's own converter; `unet_config` lets SD/SDXL map SGM block names (other
    families ignore it)."""
    read = getattr(type(pipeline), "lora_state_dict", None)
    if read is None:
        return None
    return Converter(type(pipeline).__name__, functools.partial(read, unet_config=denoiser.config))


def is_kohya(keys: list[str]) -> bool:
    return any(key.endswith(KOHYA_SUFFIXES) or key.startswith(KOHYA_PREFIXES) for key in keys)


def from_kohya(
    tensors: dict[str, torch.Tensor], converter: Converter | None, *, adapter: str
) -> dict[str, torch.Tensor]:
    """A kohya/A1111 state dict in diffusers' PEFT layout (`<component>.<module>.lora_A.weight`).

    Each module's alpha is folded into its lora_up first (and its alpha set to its rank), so the
    result needs no alphas: diffusers' default alpha = r then computes what kohya's alpha did.
    """
    family = converter.pipeline if converter is not None else "this model"
    example = next(
        key for key in sorted(tensors) if key.endswith(KOHYA_SUFFIXES) or key.startswith(KOHYA_PREFIXES)
    )
    if converter is None:
        raise IncompatibleAdapterError(
            adapter, f"is a kohya/A1111 file ({example}); {family} has no converter for kohya files"
        )
    try:
        converted = converter.read(_fold_alphas(tensors))
    except Exception as e:  # diffusers' converters raise what they like on keys they do not expect
        raise InvalidAdapterError(
            adapter,
            f"is a kohya/A1111 file ({example}) that diffusers' {family} converter refuses: "
            f"{type(e).__name__}: {e}",
        ) from e
    state = converted[0] if isinstance(converted, tuple) else converted
    if is_kohya(list(state)):
        raise IncompatibleAdapterError(
            adapter,
            f"is a kohya/A1111 file ({example}); diffusers has no kohya converter for {family}, "
            "so it cannot be read for this model (convert it to the diffusers or PEFT layout)",
        )
    if state and not any("lora_A" in key for key in state):
        from diffusers.utils import convert_unet_state_dict_to_peft

        state = convert_unet_state_dict_to_peft(state)
    return state


def _fold_alphas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for key, alpha in tensors.items():
        if not key.endswith(".alpha"):
            continue
        base = key.removesuffix(".alpha")
        down, up = tensors.get(f"{base}.lora_down.weight"), tensors.get(f"{base}.lora_up.weight")
        if down is None or up is None or down.ndim < 2 or alpha.numel() != 1:
            continue  # the converter or the checks after it name what is wrong
        rank = down.shape[0]
        out[f"{base}.lora_up.weight"] = (up.float() * (float(alpha) / rank)).to(up.dtype)
        out[key] = torch.tensor(float(rank), dtype=alpha.dtype)
    return out


class KeyLayout(StrEnum):
    PEFT = "peft"  # base_model.model.<module>... (PEFT's save_pretrained)
    PREFIXED = "prefixed"  # <component>.<module>... (a pipeline's save_lora_weights)
    UNPREFIXED = "unprefixed"  # <module>... (a model's save_lora_adapter)


def layout_of(keys: list[str]) -> KeyLayout:
    """Which layout the file uses: decided by its keys as a whole, as diffusers decides it."""
    if any(key.startswith(PEFT_PREFIX) for key in keys):
        return KeyLayout.PEFT
    if any(key.split(".", 1)[0] in PIPELINE_PARTS for key in keys):
        return KeyLayout.PREFIXED
    return KeyLayout.UNPREFIXED


def module_tensors(
    tensors: dict[str, torch.Tensor], component: str, *, adapter: str
) -> tuple[dict[str, torch.Tensor], KeyLayout]:
    """Map the file's keys to `<module>.lora_A.weight`, module paths relative to the denoiser."""
    layout = layout_of(list(tensors))
    prefix = {KeyLayout.PEFT: PEFT_PREFIX, KeyLayout.PREFIXED: f"{component}.", KeyLayout.UNPREFIXED: ""}[
        layout
    ]
    out: dict[str, torch.Tensor] = {}
    foreign: Counter[str] = Counter()
    unsupported: list[str] = []
    for key, tensor in tensors.items():
        part = key.split(".", 1)[0]
        if layout is not KeyLayout.UNPREFIXED and part != component and part in PIPELINE_PARTS:
            foreign[part] += 1
            continue
        rest = key.removeprefix(prefix)
        if not key.startswith(prefix) or not rest.endswith(LORA_SUFFIXES):
            unsupported.append(key)
            continue
        out[rest] = tensor
    if unsupported:
        shown = ", ".join(sorted(unsupported)[:3])
        raise InvalidAdapterError(
            adapter,
            f"unsupported weight key(s) {shown}: expected LoRA keys '<module>.lora_A.weight', "
            f"'{component}.<module>.lora_A.weight' or '{PEFT_PREFIX}<module>.lora_A.weight', or a kohya "
            "file the model's family converts (DoRA, LoRA biases and other formats are not supported)",
        )
    if foreign:
        parts = ", ".join(f"{part} ({count} tensors)" for part, count in sorted(foreign.items()))
        why = (
            TEXT_ENCODER_REFUSAL
            if all(p.startswith("text_encoder") for p in foreign)
            else f"only the model's {component} can be adapted"
        )
        raise IncompatibleAdapterError(adapter, f"has weights for {parts}; {why}")
    return out, layout


def default_config(tensors: dict[str, torch.Tensor]) -> dict:
    """diffusers' config for a file without one (`get_peft_kwargs`): r is the most common rank, every
    module's alpha equals its rank. Modules of another rank are named exactly (`^module`)."""
    ranks = {
        key.removesuffix(".lora_B.weight"): int(t.shape[1])
        for key, t in tensors.items()
        if key.endswith(".lora_B.weight") and t.ndim >= 2
    }
    if not ranks:
        return {"r": 1, "lora_alpha": 1}
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {f"^{module}": rank for module, rank in sorted(ranks.items()) if rank != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": others, "alpha_pattern": dict(others)}
