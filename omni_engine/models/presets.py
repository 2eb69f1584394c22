"""Built-in offline models: real StableDiffusion3Pipelines with random weights, built from configs.

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

from producer.settings import read_environment

PRESET_FORMAT_VERSION = 1
# The model an engine serves when none is named: the test-sized preset below.
DEFAULT_MODEL = "tiny-sd3"
CLIP_MAX_LENGTH = 77


@dataclass(frozen=True)
class PresetSpec:
    """Sizes of a random SD3 pipeline, and the generation defaults that suit it."""

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
}


def preset_dir(name: str) -> Path:
    """Where the preset is saved: $OMNI_CACHE_DIR or ~/.cache/omni-batch, per format version."""
    root = read_environment().cache_dir or os.path.join(Path.home(), ".cache", "omni-batch")
    return Path(root) / "models" / f"{name}-v{PRESET_FORMAT_VERSION}"


def ensure_preset(name: str) -> Path:
    """Build and save the preset once; concurrent builders race to an atomic rename."""
    target = preset_dir(name)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        pipeline = build_pipeline(PRESETS[name])
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


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2's table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _clip_tokenizer():
    """A byte-level CLIP tokenizer built in memory: every byte is a token, no merges."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in chars:
        vocab[char] = len(vocab)
    for char in chars:
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def build_pipeline(spec: PresetSpec):
    """Build the pipeline from configs; every component seeded and in eval mode."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_hidden_size * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=4,
        projection_dim=spec.text_hidden_size,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    inner_dim = spec.num_attention_heads * spec.attention_head_dim
    latent_size = spec.default_size // 2 ** (len(spec.vae_channels) - 1)

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=spec.patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.joint_attention_dim,
        caption_projection_dim=inner_dim,
        # The pipeline concatenates both CLIP projections: twice the projection dim.
        pooled_projection_dim=2 * spec.text_hidden_size,
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    torch.manual_seed(3)
    vae = AutoencoderKL(
        sample_size=spec.default_size,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(spec.vae_channels),
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
