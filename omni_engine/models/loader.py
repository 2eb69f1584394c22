"""Loading a diffusers text-to-image pipeline: a built-in preset, a local directory or a hub id."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_engine.errors import ModelError
from omni_engine.lora.formats import Converter, converter_for
from omni_engine.models.presets import PRESETS, ensure_preset

# The model component LoRA adapters apply to, in the order a pipeline is searched for it.
DENOISER_COMPONENTS = ("transformer", "unet")


@dataclass(frozen=True)
class GenerationDefaults:
    """What a call gets when it leaves size, steps or guidance unset (None: the pipeline's own)."""

    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None


@dataclass
class LoadedModel:
    model_id: str
    pipeline: object
    denoiser: torch.nn.Module
    denoiser_name: str
    defaults: GenerationDefaults
    size_multiple: int
    converter: Converter | None = None  # the pipeline's reader of kohya/A1111 LoRA files


def quiet_library_output() -> None:
    """For command-line entry points: no per-component progress bars or library chatter."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def resolve_device(device: str | torch.device | None, dtype: torch.dtype | str | None):
    """cuda + bfloat16 when a GPU is there, else cpu + float32 (the documented default of `Omni`)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ModelError(f"dtype {dtype!r} is not a torch dtype (try 'float32' or 'bfloat16')")
        dtype = resolved
    return device, dtype


def _null_components(path: Path) -> dict[str, None]:
    """Components a saved pipeline records as [null, null] must be passed as None to load it."""
    index = json.loads((path / "model_index.json").read_text())
    return {name: None for name, value in index.items() if value == [None, None]}


def load_model(model: str, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from diffusers import DiffusionPipeline

    defaults = GenerationDefaults()
    if model in PRESETS:
        spec = PRESETS[model]
        source = ensure_preset(model)
        defaults = GenerationDefaults(
            spec.default_size, spec.default_size, spec.default_steps, spec.default_guidance
        )
    elif os.path.isdir(model):
        source = Path(model)
        if not (source / "model_index.json").is_file():
            raise ModelError(f"model directory {model!r} has no model_index.json (not a diffusers pipeline)")
    else:
        source = model  # a hub id: diffusers fetches it

    kwargs = _null_components(source) if isinstance(source, Path) else {}
    if device.type == "cpu":
        # Weights that stay on the CPU would otherwise be copy-on-write pages of the mapped file:
        # the first fused call's merge then pays a page fault per 4 KiB it writes (0.77 s on
        # small-sd3's 52M targeted weights, against 0.21 s to read the whole denoiser at load).
        kwargs["disable_mmap"] = True
    try:
        # use_safetensors: never unpickle model weights either.
        pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {model!r}: {e}") from e
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)

    for name in DENOISER_COMPONENTS:
        denoiser = getattr(pipeline, name, None)
        if isinstance(denoiser, torch.nn.Module):
            break
    else:
        raise ModelError(f"model {model!r} has no transformer or unet component to apply LoRA to")
    if not hasattr(denoiser, "load_lora_adapter"):
        raise ModelError(f"model {model!r}: its {name} does not support LoRA adapters (no PEFT integration)")

    # The pipeline's image processor knows its latent packing (Flux packs 2x2: twice the VAE's factor).
    processor = getattr(pipeline, "image_processor", None)
    vae_factor = getattr(getattr(processor, "config", None), "vae_scale_factor", None)
    vae_factor = vae_factor or getattr(pipeline, "vae_scale_factor", 8)
    patch_size = getattr(denoiser.config, "patch_size", None) or 1
    return LoadedModel(
        model_id=model,
        pipeline=pipeline,
        denoiser=denoiser,
        denoiser_name=name,
        defaults=defaults,
        size_multiple=int(vae_factor * patch_size),
        converter=converter_for(pipeline, denoiser),
    )
