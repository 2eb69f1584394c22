"""Built-in offline models: real SD3, SDXL and Flux pipelines with random weights, built from configs.

They exercise the real pipeline and the real loading path (`from_pretrained`) with no model
hub: built once, deterministically (fixed seeds), saved to a cache directory, loaded from there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from omni_engine.models.builders import BUILDERS
from producer.settings import cache_dir

PRESET_FORMAT_VERSION = 1
# The model an engine serves when none is named: the test-sized preset below.
DEFAULT_MODEL = "tiny-sd3"


@dataclass(frozen=True)
class PresetSpec:
    """Sizes of a random pipeline of one family (builders.BUILDERS), and the generation defaults that
    suit it. Fields a family does not use keep their defaults."""

    name: str
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int
    text_hidden_size: int
    text_layers: int
    vae_channels: tuple[int, ...]
    patch_size: int
    default_size: int
    default_steps: int
    default_guidance: float
    family: str = "sd3"
    num_single_layers: int = 0  # Flux: single-stream blocks after the num_layers double-stream ones
    unet_channels: tuple[int, ...] = ()  # SDXL: the UNet's block_out_channels


PRESETS: dict[str, PresetSpec] = {
    # What tests use: an image at 32x32 in 2 steps takes tens of milliseconds on a CPU.
    DEFAULT_MODEL: PresetSpec(
        name=DEFAULT_MODEL,
        num_layers=1,
        num_attention_heads=4,
        attention_head_dim=8,
        joint_attention_dim=32,
        text_hidden_size=32,
        text_layers=2,
        vae_channels=(4,),
        patch_size=1,
        default_size=32,
        default_steps=2,
        default_guidance=5.0,
    ),
    # For benchmarks: large enough that loading an adapter costs what it costs (~90M parameters).
    "small-sd3": PresetSpec(
        name="small-sd3",
        num_layers=8,
        num_attention_heads=12,
        attention_head_dim=64,
        joint_attention_dim=256,
        text_hidden_size=64,
        text_layers=2,
        vae_channels=(16, 32),
        patch_size=2,
        default_size=64,
        default_steps=2,
        default_guidance=5.0,
    ),
    # For GPU benchmarks: SD3 Medium's transformer (24 blocks of width 1536, ~2B parameters) at 512x512
    # in 20 steps, with small text encoders and VAE, so a call costs what a real one costs in the
    # part LoRA touches.
    "medium-sd3": PresetSpec(
        name="medium-sd3",
        num_layers=24,
        num_attention_heads=24,
        attention_head_dim=64,
        joint_attention_dim=256,
        text_hidden_size=64,
        text_layers=2,
        vae_channels=(16, 32, 64, 64),
        patch_size=2,
        default_size=512,
        default_steps=20,
        default_guidance=5.0,
    ),
    # The same scale as tiny-sd3 for the other two families LoRAs are made for.
    "tiny-sdxl": PresetSpec(
        name="tiny-sdxl",
        family="sdxl",
        num_layers=0,
        num_attention_heads=2,
        attention_head_dim=0,
        joint_attention_dim=0,
        unet_channels=(8, 16),
        text_hidden_size=32,
        text_layers=2,
        vae_channels=(4,),
        patch_size=1,
        default_size=32,
        default_steps=2,
        default_guidance=5.0,
    ),
    "tiny-flux": PresetSpec(
        name="tiny-flux",
        family="flux",
        num_layers=1,
        num_single_layers=1,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=32,
        text_hidden_size=32,
        text_layers=2,
        vae_channels=(4,),
        patch_size=1,
        default_size=32,
        default_steps=2,
        default_guidance=3.5,
    ),
}


def preset_dir(name: str) -> Path:
    """Where the preset is saved: $OMNI_CACHE_DIR or ~/.cache/omni-batch, per format version."""
    return cache_dir() / "models" / f"{name}-v{PRESET_FORMAT_VERSION}"


def ensure_preset(name: str) -> Path:
    """Build and save the preset once; concurrent builders race to an atomic rename."""
    target = preset_dir(name)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        spec = PRESETS[name]
        pipeline = BUILDERS[spec.family](spec)
        pipeline.save_pretrained(staging, safe_serialization=True)
        _record_absent_components(staging, pipeline)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _record_absent_components(path: Path, pipeline) -> None:
    """Write unused optional components (T5, image encoder) as null, as hub repos do.

    `save_pretrained` omits them, and `from_pretrained` then refuses the directory.
    """
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    for component in pipeline._get_signature_keys(pipeline)[0]:
        index.setdefault(component, [None, None])
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True))
