"""The installed torch / diffusers / peft / transformers work together at every point the engine uses.

pyproject's ranges once resolved to a transformers whose `add_adapter` refuses the installed peft:
each integration point is called here, on tiny models built from configs, at the installed versions.
"""

from __future__ import annotations

import pytest
import torch

RANK = 2
METADATA = {"r": RANK, "lora_alpha": RANK, "target_modules": ["to_q"]}


def _tiny_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
    ).eval()


def _state_dict(model: torch.nn.Module, value: float) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA for every attention query projection, filled with `value`."""
    out = {}
    for name, module in model.named_modules():
        if name.endswith("attn.to_q"):
            out[f"{name}.lora_A.weight"] = torch.full((RANK, module.in_features), value)
            out[f"{name}.lora_B.weight"] = torch.full((module.out_features, RANK), value)
    return out


def _lora_b(model: torch.nn.Module, adapter: str) -> torch.Tensor:
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    return layer.lora_B[adapter].weight


def test_transformers_add_adapter_accepts_the_installed_peft():
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    text_encoder = CLIPTextModel(config).eval()
    text_encoder.add_adapter(LoraConfig(r=RANK, target_modules=["q_proj"]), adapter_name="x")
    assert "x" in text_encoder.peft_config
    assert any("lora_A" in name for name, _ in text_encoder.named_parameters())


def test_diffusers_load_lora_adapter_changes_the_targeted_layers():
    model = _tiny_transformer()
    state = _state_dict(model, 0.5)
    model.load_lora_adapter(state, prefix=None, adapter_name="x", metadata=METADATA)
    assert torch.equal(_lora_b(model, "x"), torch.full_like(_lora_b(model, "x"), 0.5))


def test_diffusers_hotswap_replaces_weights_in_place():
    model = _tiny_transformer()
    model.enable_lora_hotswap(target_rank=RANK)
    metadata = METADATA
    model.load_lora_adapter(_state_dict(model, 0.5), prefix=None, adapter_name="x", metadata=metadata)
    model.load_lora_adapter(
        _state_dict(model, 0.25), prefix=None, adapter_name="x", metadata=metadata, hotswap=True
    )
    assert torch.equal(_lora_b(model, "x"), torch.full_like(_lora_b(model, "x"), 0.25))
    with pytest.raises(ValueError, match="hotswap"):
        model.load_lora_adapter(
            _state_dict(model, 0.25), prefix=None, adapter_name="absent", metadata=metadata, hotswap=True
        )
