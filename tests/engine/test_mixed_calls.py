"""Calls that mix adapters: each prompt gets its own adapter and scale in one pipeline call, with the
image it gets alone (within rounding), on every model family; a failed mixed call changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.engine import TINY_MODELS, image_bytes

from omni_engine.errors import AdapterError, LoRACapacityError
from omni_engine.lora.request import LoRARequest

PROMPTS = ["a red fox", "a boat", "a lake", "a city", "a dog"]
SEEDS = [1, 2, 3, 4, 5]
# A matmul over more rows may round differently: 1 of 255 at most, where an adapter moves pixels by tens.
ROUNDING = 1
MIN_LORA_CHANGE = 8
# A call that merges one adapter and takes it back out of the other rows rounds along two paths
# (the merged weight, less the delta): each may round as far as the prompt's image alone differs
# fused and unfused, measured in the test (up to 3 levels on tiny-sdxl, by CPU and BLAS).
ROUNDING_PATHS = 2


def _pixels(output) -> np.ndarray:
    return np.asarray(output.images[0], dtype=np.int16)


def _requests(make_adapter) -> list[LoRARequest]:
    shapes = [{"rank": 4}, {"rank": 8, "alpha": 16}, {"rank": 2, "use_rslora": True}]
    return [LoRARequest(f"m{i}", i + 1, str(make_adapter(f"m{i}", **kw))) for i, kw in enumerate(shapes)]


@pytest.mark.parametrize("tiny_model", TINY_MODELS)
def test_each_prompt_gets_its_own_adapter_and_scale(omni_factory, make_adapter):
    omni = omni_factory(max_loras=3)
    a, b, c = _requests(make_adapter)
    requests, scales = [a, None, b, c, a], [1.0, 1.0, 0.5, 1.0, 2.0]

    mixed = omni.generate(PROMPTS, lora_request=requests, lora_scale=scales, seed=SEEDS)
    alone = [
        omni.generate(p, lora_request=r, lora_scale=s, seed=seed)[0]
        for p, r, s, seed in zip(PROMPTS, requests, scales, SEEDS, strict=True)
    ]
    base = [omni.generate(p, seed=seed)[0] for p, seed in zip(PROMPTS, SEEDS, strict=True)]

    for i, (m, one, plain) in enumerate(zip(mixed, alone, base, strict=True)):
        assert np.abs(_pixels(m) - _pixels(one)).max() <= ROUNDING, f"prompt {i}: not its image alone"
        if requests[i] is not None:
            assert np.abs(_pixels(one) - _pixels(plain)).max() > MIN_LORA_CHANGE, f"prompt {i}: no LoRA"
    names = [m.metadata["lora"] and m.metadata["lora"]["name"] for m in mixed]
    assert names == ["m0", None, "m1", "m2", "m0"]
    assert [m.metadata["lora_scale"] for m in mixed] == scales
    assert all(m.metadata["mixed"] and not m.metadata["fused"] for m in mixed)
    assert [m.metadata["adapter_source"] for m in mixed] == ["disk", None, "disk", "disk", "disk"]


@pytest.mark.parametrize("tiny_model", TINY_MODELS)
def test_a_call_mostly_of_one_adapter_merges_it_and_every_prompt_keeps_its_image(omni_factory, make_adapter):
    omni = omni_factory(max_loras=3, fuse="auto")
    a, b, _ = _requests(make_adapter)
    requests = [a, a, a, b, None]

    mixed = omni.generate(PROMPTS, lora_request=requests, seed=SEEDS)
    alone = [
        omni.generate(p, lora_request=r, seed=seed)[0]
        for p, r, seed in zip(PROMPTS, requests, SEEDS, strict=True)
    ]

    never = omni_factory(max_loras=3, fuse="never")
    calls = zip(PROMPTS, requests, SEEDS, strict=True)
    unfused = [never.generate(p, lora_request=r, seed=seed)[0] for p, r, seed in calls]

    # a's three prompts run merged; b's and the base prompt get a's delta taken back out.
    assert [m.metadata["fused"] for m in mixed] == [True, True, True, False, False]
    for i, (m, one, other_path) in enumerate(zip(mixed, alone, unfused, strict=True)):
        rounding = max(1, np.abs(_pixels(one) - _pixels(other_path)).max())
        difference = np.abs(_pixels(m) - _pixels(one)).max()
        assert difference <= ROUNDING_PATHS * rounding, f"prompt {i}: not its image alone ({difference})"
    # The merge is undone exactly: the base model's image is the fresh engine's, byte for byte.
    again = omni.generate(PROMPTS[4], seed=SEEDS[4])[0]
    fresh = omni_factory(max_loras=3, fuse="auto").generate(PROMPTS[4], seed=SEEDS[4])[0]
    assert image_bytes(again) == image_bytes(fresh)


@pytest.mark.parametrize("mix", ["interleaved", "merged"])
def test_outputs_come_back_in_the_callers_order_whatever_order_the_call_runs_in(
    omni_factory, make_adapter, mix
):
    # The engine runs a mixed call's prompts grouped by adapter (the merged one first): the caller
    # must not see that order, in images or in metadata.
    omni = omni_factory(max_loras=3, fuse="auto")
    a, b, _ = _requests(make_adapter)
    requests = [a, b, a, None, b] if mix == "interleaved" else [b, a, a, a, None]

    mixed = omni.generate(PROMPTS, lora_request=requests, seed=SEEDS)
    alone = [
        omni.generate(p, lora_request=r, seed=s)[0] for p, r, s in zip(PROMPTS, requests, SEEDS, strict=True)
    ]

    assert [m.prompt for m in mixed] == PROMPTS
    assert [m.metadata["seed"] for m in mixed] == SEEDS
    assert [m.metadata["lora"] and m.metadata["lora"]["name"] for m in mixed] == [
        r and r.lora_name for r in requests
    ]
    if mix == "merged":
        assert [m.metadata["fused"] for m in mixed] == [False, True, True, True, False]
    # Within rounding (two paths in a merged call, up to 2 levels each on these models), where
    # another prompt's image differs by far more.
    for i, (m, one) in enumerate(zip(mixed, alone, strict=True)):
        difference = np.abs(_pixels(m) - _pixels(one)).max()
        assert difference <= ROUNDING_PATHS * 2, f"prompt {i}: not its own image ({difference})"


def test_after_a_mixed_call_an_unmixed_one_is_the_fresh_engines_image(omni_factory, make_adapter):
    omni = omni_factory(max_loras=3)
    a, b, _ = _requests(make_adapter)
    omni.generate(PROMPTS[:2], lora_request=[a, b], seed=SEEDS[:2])

    fresh_engine = omni_factory(max_loras=3)
    for request in (a, b, None):
        again = omni.generate(PROMPTS[0], lora_request=request, seed=SEEDS[0])[0]
        fresh = fresh_engine.generate(PROMPTS[0], lora_request=request, seed=SEEDS[0])[0]
        assert image_bytes(again) == image_bytes(fresh), f"{request and request.lora_name}: state leaked"
    switched = omni.generate(PROMPTS[0], lora_request=a, seed=SEEDS[0])[0]
    assert switched.metadata["adapter_source"] == "resident"


def test_a_call_mixing_more_adapters_than_slots_is_refused_and_the_engine_serves_on(
    omni_factory, make_adapter
):
    omni = omni_factory(max_loras=2)
    a, b, c = _requests(make_adapter)
    with pytest.raises(LoRACapacityError, match=r"mixes 3 adapters.*2 resident slots \(max_loras\)"):
        omni.generate(PROMPTS[:3], lora_request=[a, b, c], seed=SEEDS[:3])
    mixed = omni.generate(PROMPTS[:2], lora_request=[a, b], seed=SEEDS[:2])
    assert [m.metadata["lora"]["name"] for m in mixed] == ["m0", "m1"]


def test_a_bad_adapter_fails_the_mixed_call_and_keeps_the_good_ones_held(
    omni_factory, make_adapter, tmp_path
):
    omni = omni_factory(max_loras=3)
    a, b, _ = _requests(make_adapter)
    omni.generate(PROMPTS[0], lora_request=a, seed=SEEDS[0])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    bad = LoRARequest("broken", 9, str(broken))

    with pytest.raises(AdapterError, match="broken"):
        omni.generate(PROMPTS[:3], lora_request=[a, bad, b], seed=SEEDS[:3])

    assert {info.name for info in omni.list_loras()} >= {"m0"}
    after = omni.generate(PROMPTS[0], lora_request=a, seed=SEEDS[0])[0]
    fresh = omni_factory(max_loras=3).generate(PROMPTS[0], lora_request=a, seed=SEEDS[0])[0]
    assert image_bytes(after) == image_bytes(fresh)


def test_per_prompt_lists_of_the_wrong_length_name_the_argument(omni_factory, make_adapter):
    omni = omni_factory()
    a, _, _ = _requests(make_adapter)
    with pytest.raises(ValueError, match="lora_request has 1 values for 2 prompts"):
        omni.generate(PROMPTS[:2], lora_request=[a], seed=SEEDS[:2])
    with pytest.raises(ValueError, match="lora_scale must be a finite number"):
        omni.generate(PROMPTS[:2], lora_request=a, lora_scale=[1.0, float("nan")], seed=SEEDS[:2])


def test_a_compiled_engine_refuses_to_mix(omni_factory, make_adapter):
    omni = omni_factory(compile="eager", max_loras=2)
    a, b, _ = _requests(make_adapter)
    with pytest.raises(ValueError, match="compiled denoiser"):
        omni.generate(PROMPTS[:2], lora_request=[a, b], seed=SEEDS[:2])


@pytest.mark.parametrize(
    ("rows", "merged"),
    [
        (["a"] * 6 + ["b"] * 2, "a"),  # b's 2 rows take two deltas each: 4 row-deltas against 8
        (["a"] * 3 + ["b", None], "a"),  # 2 + 1 against 4
        (["a"] * 4 + ["b"] * 4, None),  # 8 against 8: the merge would not save hook work
        (["a", "b"], None),
        (["a", None, None], None),  # the base rows would take the merged delta out: 2 against 1
    ],
)
def test_a_mixed_call_merges_its_largest_adapter_only_when_that_saves_hook_work(omni_factory, rows, merged):
    omni = omni_factory(max_loras=2, fuse="auto")
    keys = [(row, 1.0) if row else (None, 1.0) for row in rows]
    assert omni._mixed_merge(keys, 2) == ((merged, 1.0) if merged else None)
