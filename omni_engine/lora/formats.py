"""The key layouts an adapter's weights file may use, mapped to one: `<module>.lora_A.weight`.

diffusers and PEFT write the same LoRA under different names: PEFT's `save_pretrained` prefixes
`base_model.model.`, a pipeline's `save_lora_weights` the component (`transformer.`, `unet.`), a
model's `save_lora_adapter` nothing at all. The module paths are relative to the denoiser in
all three. A file whose config is nowhere (no adapter_config.json, no header metadata) gets
diffusers' own default, alpha = r for every module, so it computes what diffusers computes.
"""

from __future__ import annotations

from collections import Counter
from enum import StrEnum

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


class KeyLayout(StrEnum):
    PEFT = "peft"  # base_model.model.<module>... (PEFT's save_pretrained)
    PREFIXED = "prefixed"  # <component>.<module>... (a pipeline's save_lora_weights)
    UNPREFIXED = "unprefixed"  # <module>... (a model's save_lora_adapter)


def layout_of(keys: list[str], component: str) -> KeyLayout:
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
    layout = layout_of(list(tensors), component)
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
