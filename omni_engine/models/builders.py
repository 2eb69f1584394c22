"""Random pipelines built from configs, one builder per family: every component seeded and in eval mode.

Tokenizers are built in memory (a byte-level CLIP BPE and a byte-level T5 unigram), so nothing is
fetched from a model hub. Sizes come from a `PresetSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omni_engine.models.presets import PresetSpec

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 64


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


def build_sd3(spec: PresetSpec) -> Any:
    """A StableDiffusion3Pipeline (two CLIP encoders, no T5)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    text_config = _clip_config(spec, tokenizer)
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
    vae = _vae(spec, latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
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


def build_sdxl(spec: PresetSpec) -> Any:
    """A StableDiffusionXLPipeline: a UNet with text-time conditioning and two CLIP encoders."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    text_config = _clip_config(spec, tokenizer)
    time_embed_dim = 8
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=spec.default_size // 2 ** (len(spec.vae_channels) - 1),
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(spec.num_attention_heads, spec.num_attention_heads),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 1),
        # Six time ids (sizes and crop), each embedded, then the second encoder's pooled projection.
        projection_class_embeddings_input_dim=6 * time_embed_dim + spec.text_hidden_size,
        # The pipeline concatenates both encoders' hidden states.
        cross_attention_dim=2 * spec.text_hidden_size,
        norm_num_groups=1,
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(2)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    vae = _vae(spec, latent_channels=4, scaling_factor=0.13025)
    for module in (unet, text_encoder, text_encoder_2, vae):
        module.eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )


def build_flux(spec: PresetSpec) -> Any:
    """A FluxPipeline: double- and single-stream blocks, a CLIP and a T5 encoder, packed latents."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    torch.manual_seed(0)
    quarter = spec.attention_head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=spec.patch_size,
        in_channels=4,  # one latent channel, packed 2x2
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.joint_attention_dim,
        pooled_projection_dim=spec.text_hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(quarter, quarter, spec.attention_head_dim - 2 * quarter),
    )
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_clip_config(spec, tokenizer))
    torch.manual_seed(2)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=spec.joint_attention_dim,
            d_kv=8,
            d_ff=2 * spec.joint_attention_dim,
            num_layers=spec.text_layers,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = _vae(spec, latent_channels=1, shift_factor=0.0609, scaling_factor=1.5035)
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _clip_config(spec: PresetSpec, tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
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


def _vae(spec: PresetSpec, *, latent_channels: int, scaling_factor: float, shift_factor: float | None = None):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(
        sample_size=spec.default_size,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(spec.vae_channels),
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def _t5_tokenizer():
    """A T5 unigram tokenizer built in memory: its special tokens, then one piece per byte character."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(char, -1.0) for char in _byte_chars()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


BUILDERS: dict[str, Callable[[PresetSpec], Any]] = {"sd3": build_sd3, "sdxl": build_sdxl, "flux": build_flux}
