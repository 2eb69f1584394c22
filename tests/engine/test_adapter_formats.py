"""Files as diffusers and PEFT write them, beyond the two layouts of test_peft_equality: each is made
by the tool itself, and our image must equal the image that tool's own loader gives from that file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from fixtures.engine import TINY_MODELS, diffusers_reference, peft_reference
from safetensors.torch import load_file, save_file

from omni_engine.errors import InvalidAdapterError
from omni_engine.lora.adapter import DIFFUSERS_METADATA_KEY, WEIGHT_FILES, read_adapter
from omni_engine.lora.request import LoRARequest
from omni_engine.lora.synth import DEFAULT_TARGETS, randomize_lora

PROMPT, SEED = "a windmill in a field", 8
SAVED = "pytorch_lora_weights.safetensors"  # save_lora_adapter's default name


def _pixels(omni, path: Path, **kwargs) -> np.ndarray:
    request = LoRARequest("x", 1, str(path))
    image = omni.generate(PROMPT, seed=SEED, lora_request=request, **kwargs)[0].images[0]
    return np.asarray(image, dtype=np.int16)


def _base(omni) -> np.ndarray:
    return np.asarray(omni.generate(PROMPT, seed=SEED)[0].images[0], dtype=np.int16)


def save_lora_adapter(directory: Path, denoiser, *, rank=4, alpha=8.0, seed=5) -> Path:
    """What a diffusers training script leaves: `add_adapter`, trained (here: random), then
    `save_lora_adapter`, whose keys carry no component prefix and whose config is in the header."""
    from peft import LoraConfig

    model = copy.deepcopy(denoiser)
    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(DEFAULT_TARGETS), init_lora_weights=False)
    )
    randomize_lora(model, seed=seed)
    model.save_lora_adapter(str(directory))
    return directory / SAVED


def _strip_metadata(weights: Path) -> Path:
    save_file(load_file(weights), weights)
    return weights


@pytest.mark.parametrize("tiny_model", TINY_MODELS)
def test_save_lora_adapter_output_equals_diffusers(omni_factory, tiny_denoiser, tiny_model, tmp_path):
    component, denoiser = tiny_denoiser
    weights = save_lora_adapter(tmp_path / "saved", denoiser)
    assert not any(k.startswith(f"{component}.") for k in load_file(weights)), "test setup: unprefixed keys"

    omni = omni_factory()
    ours = _pixels(omni, weights.parent)
    assert np.abs(ours - _base(omni)).max() > 8, "the adapter should visibly change the image"
    assert np.abs(ours - diffusers_reference(weights, PROMPT, SEED, model=tiny_model)).max() <= 1


@pytest.mark.parametrize("tiny_model", TINY_MODELS)
def test_file_without_metadata_takes_alpha_equal_to_rank_as_diffusers(
    omni_factory, tiny_denoiser, tiny_model, tmp_path
):
    component, denoiser = tiny_denoiser
    with_header = save_lora_adapter(tmp_path / "with", denoiser, rank=4, alpha=16.0)
    bare = _strip_metadata(save_lora_adapter(tmp_path / "bare", denoiser, rank=4, alpha=16.0))

    omni = omni_factory()
    ours = _pixels(omni, bare.parent)
    assert np.abs(ours - diffusers_reference(bare, PROMPT, SEED, model=tiny_model)).max() <= 1
    # alpha 16 at rank 4 is 4x the update alpha = r gives: the header's alpha was not used.
    assert np.abs(ours - _pixels(omni, with_header.parent)).max() > 8
    read = read_adapter(str(bare.parent), name="bare", component=component, roots=None)
    assert any("lora_alpha = r" in note for note in read.notes), "the default is said, not silent"


def test_rank_pattern_keys_diffusers_writes_with_a_caret(omni_factory, tiny_transformer, tmp_path):
    """A file of mixed ranks loaded without metadata, then saved: diffusers writes `^module` keys."""
    mixed = save_lora_adapter(tmp_path / "mixed", tiny_transformer, rank=4, alpha=4.0)
    tensors = load_file(mixed)
    for key in [k for k in tensors if ".to_q." in k]:  # to_q at rank 2, the rest at rank 4
        tensors[key] = tensors[key][:2] if "lora_A" in key else tensors[key][:, :2].contiguous()
    save_file(tensors, mixed)
    model = copy.deepcopy(tiny_transformer)
    model.load_lora_adapter(str(mixed.parent), weight_name=SAVED, prefix=None, adapter_name="default")
    model.save_lora_adapter(str(tmp_path / "resaved"))
    resaved = tmp_path / "resaved" / SAVED
    header = json.loads(load_file_metadata(resaved)[DIFFUSERS_METADATA_KEY])
    assert header["rank_pattern"] and all(k.startswith("^") for k in header["rank_pattern"])

    ours = _pixels(omni_factory(), resaved.parent)
    assert np.abs(ours - diffusers_reference(resaved, PROMPT, SEED)).max() <= 1


def load_file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_single_other_safetensors_file_or_the_file_itself(omni_factory, tiny_transformer, tmp_path):
    weights = save_lora_adapter(tmp_path / "renamed", tiny_transformer)
    renamed = weights.rename(weights.parent / "my_lora.safetensors")
    reference = diffusers_reference(renamed, PROMPT, SEED)

    omni = omni_factory()
    assert np.abs(_pixels(omni, renamed.parent) - reference).max() <= 1
    # The file named directly is the same content under another path: read, and the same image.
    assert np.abs(_pixels(omni, renamed) - reference).max() <= 1
    assert omni.lora_stats()["disk_loads"] == 2

    (renamed.parent / "other.safetensors").write_bytes(renamed.read_bytes())
    with pytest.raises(InvalidAdapterError) as refused:
        omni.add_lora(LoRARequest("two", 3, str(renamed.parent)))
    message = str(refused.value)
    assert all(name in message for name in (*WEIGHT_FILES, "my_lora.safetensors", "other.safetensors"))


def test_a_null_config_key_this_peft_does_not_know_is_ignored(omni_factory, make_adapter):
    path = make_adapter("future", rank=4, alpha=8)
    config = json.loads((path / "adapter_config.json").read_text())
    config["option_of_a_newer_peft"] = None
    (path / "adapter_config.json").write_text(json.dumps(config))

    ours = _pixels(omni_factory(), path)
    assert np.abs(ours - peft_reference(path, PROMPT, SEED)).max() <= 1

    config["option_of_a_newer_peft"] = 3  # set to something: it might change the image
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidAdapterError, match="option_of_a_newer_peft"):
        omni_factory().add_lora(LoRARequest("set", 1, str(path)))


def test_peft_keys_without_a_config_are_refused_with_the_fix(omni_factory, make_adapter):
    path = make_adapter("no-config")
    (path / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapterError, match="needs its config beside the weights"):
        omni_factory().add_lora(LoRARequest("x", 1, str(path)))
