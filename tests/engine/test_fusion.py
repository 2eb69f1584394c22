"""Fused calls: the adapter merged into the base weights for one call, then restored bit for bit."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from fixtures.engine import TINY_MODELS, image_bytes, peft_reference

from omni_engine.lora import fusion
from omni_engine.lora.fuse_mode import FuseMode
from omni_engine.lora.request import LoRARequest

PROMPT, SEED = "a lantern on a pier", 5


def _base_digest(omni) -> str:
    """sha256 over every base parameter of the denoiser (LoRA layers' own weights left out)."""
    digest = hashlib.sha256()
    params = {n.replace(".base_layer", ""): p for n, p in omni.pipeline.transformer.named_parameters()}
    for name, param in sorted(params.items()):
        if "lora_" in name:
            continue
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _pixels(output) -> np.ndarray:
    return np.asarray(output.images[0] if hasattr(output, "images") else output, dtype=np.int16)


def test_any_sequence_of_fused_calls_leaves_every_base_weight_bit_identical(omni_factory, make_adapter):
    omni = omni_factory(fuse="always", max_loras=1, max_cpu_loras=2)
    loaded = _base_digest(omni)
    a = LoRARequest("a", 1, str(make_adapter("a", rank=4)))
    b = LoRARequest("b", 2, str(make_adapter("b", rank=8, targets=("to_q", "ff.net.2", "proj_out"))))
    c = LoRARequest("c", 3, str(make_adapter("c", rank=2, alpha=7, use_rslora=True)))
    base = image_bytes(omni.generate(PROMPT, seed=SEED)[0])
    calls = [(a, 1.0), (b, -2.5), (a, 0.5), (c, 3.0), (None, 1.0), (b, 1.0), (c, 0.0), (a, 1.0)]
    for request, scale in calls:
        output = omni.generate([PROMPT, "two"], seed=SEED, lora_request=request, lora_scale=scale)[0]
        assert output.metadata["fused"] is (request is not None and scale != 0.0)
        assert _base_digest(omni) == loaded, f"base weights changed after {request and request.lora_name}"
    assert image_bytes(omni.generate(PROMPT, seed=SEED)[0]) == base


def test_unfused_calls_between_fused_ones_leave_the_weights_as_loaded(omni_factory, make_adapter):
    fused = omni_factory(fuse="always")
    loaded = _base_digest(fused)
    request = LoRARequest("a", 1, str(make_adapter("a")))
    fused.fuse = FuseMode.NEVER  # the same engine, now injecting: PEFT layers wrap the weights
    unfused_before = image_bytes(fused.generate(PROMPT, seed=SEED, lora_request=request)[0])
    fused.fuse = FuseMode.ALWAYS
    fused.generate(PROMPT, seed=SEED, lora_request=request, lora_scale=2.0)
    assert _base_digest(fused) == loaded
    fused.fuse = FuseMode.NEVER
    output = fused.generate(PROMPT, seed=SEED, lora_request=request)[0]
    assert not output.metadata["fused"]
    assert image_bytes(output) == unfused_before


@pytest.mark.parametrize("tiny_model", TINY_MODELS)
def test_a_fused_image_matches_peft_merged_and_unfused_within_rounding(
    omni_factory, make_adapter, tiny_model
):
    adapter_dir = make_adapter("a", rank=8, alpha=32, targets=("to_q", "to_v", "proj_out", "ff.net.2"))
    request = LoRARequest("a", 1, str(adapter_dir))
    fused = _pixels(omni_factory(fuse="always").generate(PROMPT, seed=SEED, lora_request=request)[0])
    unfused_omni = omni_factory(fuse="never")
    base = _pixels(unfused_omni.generate(PROMPT, seed=SEED)[0])
    unfused = _pixels(unfused_omni.generate(PROMPT, seed=SEED, lora_request=request)[0])

    merged = peft_reference(adapter_dir, PROMPT, SEED, merged=True, model=tiny_model)

    assert np.abs(fused - base).max() > 8, "the adapter should visibly change the image"
    assert np.abs(fused - merged).max() <= 1
    assert np.abs(fused - unfused).max() <= 1


def test_fused_calls_hold_adapters_without_injecting_them(omni_factory, make_adapter):
    omni = omni_factory(fuse="always")
    request = LoRARequest("a", 1, str(make_adapter("a")))
    sources = [
        omni.generate(PROMPT, seed=SEED, lora_request=request)[0].metadata["adapter_source"] for _ in range(2)
    ]
    assert sources == ["disk", "host"]
    [info] = omni.list_loras()
    assert not info.resident
    assert not getattr(omni.pipeline.transformer, "peft_config", None), "nothing was injected"
    stats = omni.lora_stats()
    assert stats["disk_loads"] == 1 and stats["cpu_hits"] == 1


def test_a_failed_merge_restores_every_weight_it_touched(omni_factory, make_adapter, monkeypatch):
    # Simulated: a device running out of memory part-way through a merge (no GPU here).
    omni = omni_factory(fuse="always")
    loaded = _base_digest(omni)
    request = LoRARequest("a", 1, str(make_adapter("a")))
    real_add, calls = fusion.add_delta, []

    def failing_add(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("simulated: out of memory while merging")
        return real_add(*args, **kwargs)

    monkeypatch.setattr(fusion, "add_delta", failing_add)
    with pytest.raises(torch.OutOfMemoryError):
        omni.generate(PROMPT, seed=SEED, lora_request=request)
    assert len(calls) == 3
    assert _base_digest(omni) == loaded
    monkeypatch.setattr(fusion, "add_delta", real_add)
    assert omni.generate(PROMPT, seed=SEED, lora_request=request)[0].metadata["fused"]


@pytest.mark.parametrize("fuse", ["auto", "always", "never"])
def test_one_image_per_call_is_bit_stable_whatever_ran_before(omni_factory, make_adapter, fuse):
    """OMNI_MAX_BATCH=1: a job's bytes do not depend on what it was grouped or batched with."""
    a = LoRARequest("a", 1, str(make_adapter("a")))
    b = LoRARequest("b", 2, str(make_adapter("b", rank=8)))
    alone = image_bytes(omni_factory(fuse=fuse).generate(PROMPT, seed=SEED, lora_request=a)[0])
    omni = omni_factory(fuse=fuse, max_loras=1, max_cpu_loras=1)
    for request, scale in [(b, 2.0), (a, 0.5), (None, 1.0), (b, 1.0)]:
        omni.generate(["other", "prompts", "here", "too"], seed=1, lora_request=request, lora_scale=scale)
    assert image_bytes(omni.generate(PROMPT, seed=SEED, lora_request=a)[0]) == alone


def test_auto_fuses_calls_with_enough_image_steps(omni_factory, make_adapter):
    omni = omni_factory(fuse="auto")
    request = LoRARequest("a", 1, str(make_adapter("a")))
    one = omni.generate(PROMPT, seed=SEED, lora_request=request, num_inference_steps=1)[0]
    batch = omni.generate([PROMPT] * 4, seed=SEED, lora_request=request, num_inference_steps=1)[0]
    assert not one.metadata["fused"] and batch.metadata["fused"]


def test_an_unknown_fuse_mode_is_refused_by_name(omni_factory):
    with pytest.raises(ValueError, match="fuse must be one of"):
        omni_factory(fuse="sometimes")
