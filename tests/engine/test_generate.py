"""Generation through the engine with the real tiny model and real PEFT adapters."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fixtures.engine import TINY_MODELS, image_bytes
from safetensors.torch import load_file, save_file

from omni_engine import Omni
from omni_engine.lora.request import LoRARequest
from omni_engine.models.presets import preset_dir


def test_seed_example_runs_as_written_and_loads_nothing_twice(make_adapter):
    lora_path = str(make_adapter("preloaded"))

    omni = Omni(model="tiny-sd3", lora_path=lora_path)
    lora_request = LoRARequest(lora_name="preloaded", lora_int_id=1, lora_path=lora_path)
    outputs = omni.generate(prompt="A piece of cheesecake", lora_request=lora_request, lora_scale=2.0)

    assert len(outputs) == 1 and outputs[0].images[0].size == (32, 32)
    stats = omni.lora_stats()
    assert stats["disk_loads"] == 1, "the pre-loaded adapter was loaded again"
    assert stats["gpu_hits"] == 1 and stats["cpu_hits"] == 0
    meta = outputs[0].metadata
    assert meta["adapter_source"] == "resident"
    assert meta["lora_scale"] == 2.0 and meta["lora"]["name"] == "preloaded"
    assert len(meta["lora"]["sha256"]) == 64 and isinstance(meta["seed"], int)
    [info] = omni.list_loras()
    assert info.pinned and info.resident and info.lora_int_ids == (1,)


@pytest.mark.parametrize("tiny_model", TINY_MODELS)
def test_lora_changes_the_image_and_adapters_differ(omni_factory, make_adapter):
    omni = omni_factory()
    a = LoRARequest("a", 1, str(make_adapter("a")))
    b = LoRARequest("b", 2, str(make_adapter("b")))
    base = image_bytes(omni.generate("a red fox", seed=7)[0])
    with_a = image_bytes(omni.generate("a red fox", seed=7, lora_request=a)[0])
    with_b = image_bytes(omni.generate("a red fox", seed=7, lora_request=b)[0])
    assert len({base, with_a, with_b}) == 3


@pytest.mark.parametrize("tiny_model", TINY_MODELS)
def test_scale_zero_is_the_base_model_bit_for_bit(omni_factory, make_adapter):
    omni = omni_factory()
    request = LoRARequest("a", 1, str(make_adapter("a")))
    base = image_bytes(omni.generate("a lighthouse", seed=3)[0])
    assert image_bytes(omni.generate("a lighthouse", seed=3, lora_request=request)[0]) != base
    assert image_bytes(omni.generate("a lighthouse", seed=3, lora_request=request, lora_scale=0.0)[0]) == base
    # And the base model is untouched after adapters were used.
    assert image_bytes(omni.generate("a lighthouse", seed=3)[0]) == base


def test_scale_changes_the_image_without_a_load(omni_factory, make_adapter):
    omni = omni_factory()
    request = LoRARequest("a", 1, str(make_adapter("a")))
    one = image_bytes(omni.generate("a boat", seed=1, lora_request=request, lora_scale=1.0)[0])
    two = image_bytes(omni.generate("a boat", seed=1, lora_request=request, lora_scale=2.0)[0])
    again = image_bytes(omni.generate("a boat", seed=1, lora_request=request, lora_scale=1.0)[0])
    assert one != two and one == again
    stats = omni.lora_stats()
    assert stats["disk_loads"] == 1 and stats["gpu_hits"] == 2


def test_same_seed_same_bytes_across_engines(omni_factory, make_adapter):
    request = LoRARequest("a", 1, str(make_adapter("a")))
    first = image_bytes(omni_factory().generate("a tree", seed=11, lora_request=request)[0])
    second = image_bytes(omni_factory().generate("a tree", seed=11, lora_request=request)[0])
    assert first == second


def test_prompt_list_gives_one_output_per_prompt_and_batching_keeps_each_image(omni_factory):
    omni = omni_factory()
    outputs = omni.generate(["a cat", "a dog"], seed=[5, 9])
    assert [o.prompt for o in outputs] == ["a cat", "a dog"]
    assert [o.metadata["seed"] for o in outputs] == [5, 9]
    assert image_bytes(outputs[0]) != image_bytes(outputs[1])
    alone = omni.generate("a dog", seed=9)[0]
    # Per-prompt generators: the same latents alone or in a batch (values may differ by float noise).
    import numpy as np

    diff = np.abs(np.asarray(outputs[1].images[0], dtype=int) - np.asarray(alone.images[0], dtype=int))
    assert diff.max() <= 1


def test_omitted_seed_is_random_and_recorded(omni_factory):
    omni = omni_factory()
    first, second = omni.generate("a cloud")[0], omni.generate("a cloud")[0]
    assert first.metadata["seed"] != second.metadata["seed"]
    replay = omni.generate("a cloud", seed=first.metadata["seed"])[0]
    assert image_bytes(replay) == image_bytes(first)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"height": 0}, "height"),
        ({"width": "32"}, "width"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"lora_scale": float("inf")}, "lora_scale"),
        ({"seed": -1}, "seed"),
        ({"seed": [1, 2]}, "seed"),
    ],
)
def test_bad_arguments_name_the_field(omni_factory, kwargs, field):
    omni = omni_factory()
    with pytest.raises(ValueError, match=field):
        omni.generate("a cat", **kwargs)


def test_metadata_records_what_made_the_image(omni_factory, make_adapter):
    omni = omni_factory()
    request = LoRARequest("style", 4, str(make_adapter("style", rank=8)))
    meta = omni.generate("a bridge", seed=2, lora_request=request, lora_scale=0.5)[0].metadata
    assert meta["seed"] == 2 and meta["model"] == "tiny-sd3"
    assert meta["lora"]["rank"] == 8 and meta["lora"]["lora_int_id"] == 4
    assert meta["adapter_source"] == "disk" and meta["lora_scale"] == 0.5
    assert (meta["height"], meta["width"], meta["num_inference_steps"]) == (32, 32, 2)
    assert {"torch", "diffusers", "peft"} <= set(meta["versions"])
    assert meta["timings"]["generate_s"] > 0
    assert omni.generate("a bridge", seed=2)[0].metadata["lora"] is None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("tiny_model", TINY_MODELS)
def test_a_cpu_engine_holds_its_weights_in_its_own_memory(omni_factory, tiny_model):
    """The denoiser's weights, which fused calls write, are not pages of its file: a merge would
    page-fault on every page it writes first. (The text encoders, never written, stay mapped.)"""
    omni = omni_factory()
    denoiser_dir = preset_dir(tiny_model) / omni._model.denoiser_name
    mapped = Path("/proc/self/maps").read_text()
    assert f"{preset_dir(tiny_model)}/text_encoder/" in mapped, "the check sees mapped model files"
    assert f"{denoiser_dir}/" not in mapped
    assert omni.generate("a lighthouse", seed=1)[0].images


@pytest.mark.parametrize("fuse", ["never", "always"])
def test_a_bfloat16_engine_holds_adapters_in_bfloat16_and_a_float32_file_changes_no_image(
    omni_factory, make_adapter, fuse
):
    """Held in the layers' dtype: half the host memory of a float32 file, and the same images as
    the same weights saved in bfloat16 (a conv layer's fused delta included)."""
    fp32 = make_adapter("a", targets=("to_q", "to_out.0", "pos_embed.proj"))
    bf16 = fp32.parent / "a-bf16"
    shutil.copytree(fp32, bf16)
    weights = bf16 / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    omni = omni_factory(dtype="bfloat16", fuse=fuse)

    images = [
        omni.generate("a red boat", seed=3, lora_request=LoRARequest(path.name, i, str(path)))[0]
        for i, path in enumerate((fp32, bf16), start=1)
    ]

    held = omni._lora._held_at(fp32.resolve())
    assert {t.dtype for t in held.tensors.values()} == {torch.bfloat16}
    assert images[0].metadata["fused"] is (fuse == "always")
    assert images[0].images[0].tobytes() == images[1].images[0].tobytes()
