"""kohya/A1111 files (sd-scripts' `lora_unet_<module>.lora_down.weight`, `.alpha`), with key names built
from the model's own modules: converted in memory by diffusers' converter for the model's family, then
checked and applied as any adapter. The image must equal the one diffusers' `load_lora_weights` gives
from the same file; SD3, which diffusers has no kohya converter for, refuses naming the format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.engine import diffusers_reference
from safetensors.torch import save_file

from omni_engine.errors import IncompatibleAdapterError
from omni_engine.lora.adapter import read_adapter
from omni_engine.lora.request import LoRARequest

PROMPT, SEED = "a lantern on a table", 13
RANK, ALPHA = 4, 2.0  # alpha / rank = 0.5: a file whose alpha is ignored gives another image
KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": str(RANK),
    "ss_network_alpha": "2.0",
}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2")


class KohyaFile:
    """sd-scripts' names and layout: one lora_down / lora_up / alpha triple per (fused) module."""

    def __init__(self, seed: int = 0) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._generator = torch.Generator().manual_seed(seed)

    def pair(self, name: str, in_features: int, out_features: int) -> None:
        down = torch.randn(RANK, in_features, generator=self._generator) * 2 / in_features**0.5
        up = torch.randn(out_features, RANK, generator=self._generator) * 2 / RANK**0.5
        self.tensors[f"{name}.lora_down.weight"] = down
        self.tensors[f"{name}.lora_up.weight"] = up
        self.tensors[f"{name}.alpha"] = torch.tensor(ALPHA)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, path, metadata=KOHYA_METADATA)
        return path


def unet_style(denoiser: torch.nn.Module) -> KohyaFile:
    """`lora_unet_` + the module path with `_` for `.`: SD/SDXL UNets (and SD3, where it means nothing)."""
    kohya = KohyaFile()
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(UNET_TARGETS):
            kohya.pair("lora_unet_" + name.replace(".", "_"), module.in_features, module.out_features)
    return kohya


def flux_style(transformer: torch.nn.Module) -> KohyaFile:
    """Black Forest Labs' block names, with q, k, v (and the single blocks' MLP input) fused."""
    kohya = KohyaFile()
    for i, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        qkv = attn.to_q.out_features + attn.to_k.out_features + attn.to_v.out_features
        kohya.pair(f"lora_unet_double_blocks_{i}_img_attn_qkv", attn.to_q.in_features, qkv)
        kohya.pair(
            f"lora_unet_double_blocks_{i}_img_attn_proj",
            attn.to_out[0].in_features,
            attn.to_out[0].out_features,
        )
        kohya.pair(
            f"lora_unet_double_blocks_{i}_img_mlp_0",
            block.ff.net[0].proj.in_features,
            block.ff.net[0].proj.out_features,
        )
        kohya.pair(
            f"lora_unet_double_blocks_{i}_img_mlp_2",
            block.ff.net[2].in_features,
            block.ff.net[2].out_features,
        )
        context_qkv = (
            attn.add_q_proj.out_features + attn.add_k_proj.out_features + attn.add_v_proj.out_features
        )
        kohya.pair(f"lora_unet_double_blocks_{i}_txt_attn_qkv", attn.add_q_proj.in_features, context_qkv)
        kohya.pair(
            f"lora_unet_double_blocks_{i}_txt_attn_proj",
            attn.to_add_out.in_features,
            attn.to_add_out.out_features,
        )
    # linear1 (q, k, v and the MLP input fused) is left out: diffusers' converter splits it at
    # FLUX.1's real sizes (3072 x 3 + 12288), which a tiny model does not have.
    for i, block in enumerate(transformer.single_transformer_blocks):
        kohya.pair(
            f"lora_unet_single_blocks_{i}_linear2", block.proj_out.in_features, block.proj_out.out_features
        )
    return kohya


BUILD = {"tiny-sdxl": unet_style, "tiny-flux": flux_style}


@pytest.mark.parametrize("tiny_model", sorted(BUILD))
def test_kohya_file_equals_diffusers_load_lora_weights(omni_factory, tiny_denoiser, tiny_model, tmp_path):
    _, denoiser = tiny_denoiser
    weights = BUILD[tiny_model](denoiser).save(tmp_path / "styles" / "my_style.safetensors")

    omni = omni_factory()
    base = np.asarray(omni.generate(PROMPT, seed=SEED)[0].images[0], dtype=np.int16)
    request = LoRARequest("kohya", 1, str(weights.parent))
    ours = np.asarray(omni.generate(PROMPT, seed=SEED, lora_request=request)[0].images[0], dtype=np.int16)
    reference = diffusers_reference(weights, PROMPT, SEED, model=tiny_model, pipeline=True)

    assert np.abs(ours - base).max() > 8, "the adapter should visibly change the image"
    assert np.abs(ours - reference).max() <= 1
    [held] = omni.list_loras()
    assert held.rank == RANK and held.path == str(weights.parent)


@pytest.mark.parametrize("tiny_model", sorted(BUILD))
def test_kohya_alpha_is_honoured(omni_factory, tiny_denoiser, tiny_model, tmp_path):
    """The same file with alpha = rank: twice the update, so another image (the alpha was not dropped)."""
    _, denoiser = tiny_denoiser
    kohya = BUILD[tiny_model](denoiser)
    half = kohya.save(tmp_path / "half" / "lora.safetensors")
    for key in [k for k in kohya.tensors if k.endswith(".alpha")]:
        kohya.tensors[key] = torch.tensor(float(RANK))
    full = kohya.save(tmp_path / "full" / "lora.safetensors")

    omni = omni_factory()
    images = [
        np.asarray(
            omni.generate(PROMPT, seed=SEED, lora_request=LoRARequest(p.parent.name, i, str(p)))[0].images[0],
            dtype=np.int16,
        )
        for i, p in enumerate((half, full), start=1)
    ]
    assert np.abs(images[0] - images[1]).max() > 8
    assert (
        np.abs(images[1] - diffusers_reference(full, PROMPT, SEED, model=tiny_model, pipeline=True)).max()
        <= 1
    )


def test_sd3_refuses_kohya_files_naming_the_format(omni_factory, tiny_denoiser, tmp_path):
    _, denoiser = tiny_denoiser  # tiny-sd3
    weights = unet_style(denoiser).save(tmp_path / "sd3-kohya" / "lora.safetensors")
    with pytest.raises(IncompatibleAdapterError, match="kohya") as refused:
        omni_factory().add_lora(LoRARequest("k", 1, str(weights)))
    assert "StableDiffusion3Pipeline" in str(refused.value)


@pytest.mark.parametrize("tiny_model", sorted(BUILD))
def test_kohya_text_encoder_part_is_refused_naming_it(tiny_denoiser, tiny_model, tmp_path):
    from omni_engine.models.loader import load_model

    component, denoiser = tiny_denoiser
    kohya = BUILD[tiny_model](denoiser)
    kohya.pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)
    weights = kohya.save(tmp_path / "with-te" / "lora.safetensors")
    converter = load_model(tiny_model, device=torch.device("cpu"), dtype=torch.float32).converter
    with pytest.raises(IncompatibleAdapterError) as refused:
        read_adapter(str(weights), name="te", component=component, roots=None, converter=converter)
    message = str(refused.value)
    assert "text_encoder" in message and "text-encoder LoRA is not supported" in message
