"""Resident slots: a host hit is a copy into a slot built once; any adapter through a used slot
gives the image a fresh engine (and PEFT) gives; a failed load leaves every slot as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures.engine import image_bytes, peft_reference

from omni_engine.errors import IncompatibleAdapterError
from omni_engine.lora import slots
from omni_engine.lora.request import LoRARequest

PROMPT, SEED = "a red boat", 3
SLOT = f"{slots.SLOT_PREFIX}0"

# Ranks, alphas, rsLoRA, targets and layouts a single slot must take one after the other.
MIXED = {
    "r4": {"rank": 4},
    "r8-alpha32-targets": {"rank": 8, "alpha": 32, "targets": ("to_q", "to_v", "proj_out", "ff.net.2")},
    "r2-rslora": {"rank": 2, "alpha": 7, "use_rslora": True},
    "r3-diffusers": {"rank": 3, "alpha": 1.5, "layout": "diffusers", "targets": ("to_k", "add_q_proj")},
    "r5-conv": {"rank": 5, "targets": ("pos_embed.proj", "to_out.0")},
}


def _image(omni, request=None, scale=1.0) -> bytes:
    return image_bytes(omni.generate(PROMPT, seed=SEED, lora_request=request, lora_scale=scale)[0])


def _lora_modules(omni) -> dict[str, int]:
    """id() of every PEFT module (wrappers and their lora_A/lora_B): a rebuild replaces them."""
    return {n: id(m) for n, m in omni.pipeline.transformer.named_modules() if "lora_" in n}


def _lora_params(omni) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in omni.pipeline.transformer.named_parameters() if "lora_" in n}


def _buffers(omni, slot=SLOT) -> dict[str, tuple[int, int]]:
    return {m: (a.data_ptr(), b.data_ptr()) for m, (a, b) in omni._lora._slots.buffers(slot).items()}


def test_a_host_hit_is_a_copy_into_a_slot_built_once(omni_factory, make_adapter):
    omni = omni_factory(max_loras=1, max_cpu_loras=3)
    a = LoRARequest("a", 1, str(make_adapter("a", rank=4)))
    b = LoRARequest("b", 2, str(make_adapter("b", rank=8, alpha=2)))
    first = _image(omni, a)
    _image(omni, b)  # same modules: into a's slot, which is built already
    bank = omni._lora._slots
    modules, params, buffers, builds = _lora_modules(omni), _lora_params(omni), _buffers(omni), bank.builds

    output = omni.generate(PROMPT, seed=SEED, lora_request=a)[0]

    assert output.metadata["adapter_source"] == "host"
    assert image_bytes(output) == first == _image(omni_factory(), a)
    assert bank.builds == builds == 1, "one build for the slot, none for the later loads"
    assert _lora_modules(omni) == modules, "no PEFT module was built again"
    assert _buffers(omni) == buffers and buffers, "the slot's buffers were not reallocated"
    # Every LoRA weight is a view at the start of its slot buffer: nothing of its own.
    starts = {ptr for pair in buffers.values() for ptr in pair}
    assert set(_lora_params(omni).values()) <= starts and _lora_params(omni).keys() == params.keys()
    assert omni.lora_stats()["cpu_hits"] == 1 and omni.lora_stats()["resident_evictions"] == 2


def test_slot_buffers_are_sized_for_max_lora_rank(omni_factory, make_adapter):
    omni = omni_factory(max_lora_rank=8)
    _image(omni, LoRARequest("a", 1, str(make_adapter("a", rank=2, targets=("to_q", "proj_out")))))
    layers = omni._lora._layers
    buffers = omni._lora._slots.buffers(SLOT)
    assert sorted(buffers) == ["proj_out", "transformer_blocks.0.attn.to_q"]
    for module, (a, b) in buffers.items():
        shape = layers[module]
        assert (a.numel(), b.numel()) == (8 * shape.in_features, 8 * shape.out_features)
        assert a.dtype == b.dtype == omni.dtype


def test_mixed_adapters_through_one_slot_equal_a_fresh_engine_each(omni_factory, make_adapter):
    requests = {
        name: LoRARequest(name, i, str(make_adapter(name, **kwargs)))
        for i, (name, kwargs) in enumerate(MIXED.items(), start=1)
    }
    fresh = {name: _image(omni_factory(), request) for name, request in requests.items()}
    omni = omni_factory(max_loras=1, max_cpu_loras=len(MIXED))
    base = _image(omni)
    order = [*MIXED, *reversed(MIXED)]  # from disk, then every one a host hit into the used slot
    for name in order:
        assert _image(omni, requests[name]) == fresh[name], name
        assert fresh[name] != base, name
    assert omni.lora_stats()["cpu_hits"] == len(MIXED) - 1
    assert _image(omni, requests["r4"], scale=0.0) == base
    assert _image(omni) == base


def test_an_adapter_in_a_used_slot_equals_peftmodel(omni_factory, make_adapter):

    kwargs = MIXED["r8-alpha32-targets"]
    request = LoRARequest("x", 1, str(make_adapter("x", seed=99, **kwargs)))
    omni = omni_factory(max_loras=1, max_cpu_loras=4)
    for name in ("r4", "r3-diffusers"):  # the slot covers more modules than x targets
        _image(omni, LoRARequest(name, 2, str(make_adapter(name, **MIXED[name]))))
    ours = np.asarray(omni.generate(PROMPT, seed=SEED, lora_request=request)[0].images[0], dtype=np.int16)

    theirs = peft_reference(request.lora_path, PROMPT, SEED)
    assert np.abs(ours - theirs).max() <= 1


@pytest.fixture
def full(omni_factory, make_adapter):
    """One slot, in use by `a`; `b` held in host memory; their images and the base image."""
    omni = omni_factory(max_loras=1, max_cpu_loras=4)
    a = LoRARequest("a", 1, str(make_adapter("a", seed=1)))
    b = LoRARequest("b", 2, str(make_adapter("b", seed=2, rank=6)))
    images = {"base": _image(omni), "b": _image(omni, b), "a": _image(omni, a)}
    return omni, a, b, images


def _state(omni):
    stats = omni.lora_stats()
    del stats["stall_s"]  # a duration, which the failed call's read adds to
    return omni.list_loras(), stats, _buffers(omni)


def _fail_on_call(monkeypatch, owner, attribute, calls: set[int], error: BaseException) -> None:
    real = getattr(owner, attribute)
    count = []

    def failing(*args, **kwargs):
        count.append(1)
        if len(count) in calls:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, failing)


@pytest.mark.parametrize(
    ("stage", "new_modules"),
    [("copy", False), ("build", True)],
    ids=["copy-into-the-slot", "rebuilding-the-slot"],
)
def test_a_load_failing_in_the_slot_puts_back_the_adapter_it_held(
    full, make_adapter, monkeypatch, stage, new_modules
):
    omni, a, b, images = full
    targets = ("to_q", "proj_out") if new_modules else ("to_q", "to_k")
    new = LoRARequest("new", 3, str(make_adapter("new", seed=3, targets=targets)))
    before = _state(omni)
    error = torch.OutOfMemoryError("CUDA out of memory (simulated)")
    if stage == "copy":  # half of the new adapter copied over a's weights
        real_copy = slots._copy

        def copy_half_once(targets, sources):
            monkeypatch.setattr(slots, "_copy", real_copy)
            half = len(targets) // 2
            real_copy(targets[:half], sources[:half])
            raise error

        monkeypatch.setattr(slots, "_copy", copy_half_once)
    else:  # the slot rebuilt over more modules: a's layers are gone when PEFT fails
        from peft.tuners.lora.layer import LoraLayer

        _fail_on_call(monkeypatch, LoraLayer, "update_layer", {2}, error)

    with pytest.raises(torch.OutOfMemoryError):
        omni.generate(PROMPT, seed=SEED, lora_request=new)
    monkeypatch.undo()

    assert _state(omni) == before, "out of memory is no load failure of the adapter's"
    output = omni.generate(PROMPT, seed=SEED, lora_request=a)[0]
    assert output.metadata["adapter_source"] == "resident" and image_bytes(output) == images["a"]
    assert _image(omni) == images["base"]
    assert _image(omni, b) == images["b"], "the engine still loads adapters into the slot"
    assert omni.generate(PROMPT, seed=SEED, lora_request=new)[0].metadata["adapter_source"] == "disk"


def test_a_rebuild_that_keeps_failing_leaves_the_resident_adapters_in_place(full, make_adapter, monkeypatch):
    """New layers are built before the old ones go: no failure of theirs costs a resident adapter."""
    omni, a, b, images = full
    new = LoRARequest("new", 3, str(make_adapter("new", seed=3, targets=("to_q", "proj_out"))))
    from peft.tuners.lora.layer import LoraLayer

    before = _state(omni)
    error = torch.OutOfMemoryError("CUDA out of memory (simulated)")
    _fail_on_call(monkeypatch, LoraLayer, "update_layer", set(range(1, 100)), error)
    for _ in range(2):
        with pytest.raises(torch.OutOfMemoryError):
            omni.generate(PROMPT, seed=SEED, lora_request=new)
    monkeypatch.undo()

    assert _state(omni) == before
    output = omni.generate(PROMPT, seed=SEED, lora_request=a)[0]
    assert output.metadata["adapter_source"] == "resident" and image_bytes(output) == images["a"]
    assert _image(omni) == images["base"] and _image(omni, b) == images["b"]


@pytest.mark.parametrize("fault", ["shape", "foreign", "unknown-module"])
def test_an_adapter_refused_before_the_slot_changes_nothing(full, make_adapter, fault):
    from safetensors.torch import load_file, save_file

    omni, a, _, images = full
    path = make_adapter("bad", seed=4)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("to_q.lora_A.weight"))
    if fault == "shape":
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    elif fault == "foreign":
        tensors["text_encoder.layer.lora_A.weight"] = tensors.pop(key)
    else:
        tensors[key.replace("to_q", "to_nowhere")] = tensors.pop(key)
        b_key = key.replace("lora_A", "lora_B")
        tensors[b_key.replace("to_q", "to_nowhere")] = tensors.pop(b_key)
    save_file(tensors, weights)
    before = _state(omni)
    with pytest.raises(IncompatibleAdapterError):
        omni.generate(PROMPT, seed=SEED, lora_request=LoRARequest("bad", 3, str(path)))
    lists, stats, buffers = _state(omni)
    assert lists == before[0] and buffers == before[2]
    assert stats == {**before[1], "load_failures": before[1]["load_failures"] + 1}
    assert _image(omni, a) == images["a"] and _image(omni) == images["base"]


@pytest.mark.parametrize(
    ("tokens", "term_dtype"),
    [(4, torch.float32), (None, torch.float32), (4, torch.float64)],
    ids=["tokens", "rows-only", "other-dtype"],
)
def test_a_mixed_calls_hook_adds_each_terms_delta_to_its_rows_only(tokens, term_dtype) -> None:
    # Rows of one term need not be consecutive (runs), and guidance repeats the prompts in blocks.
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    deltas = [
        slots._Delta(torch.randn(2, 6, dtype=term_dtype), torch.randn(5, 2, dtype=term_dtype), 0.5),
        slots._Delta(torch.randn(3, 6, dtype=term_dtype), torch.randn(5, 3, dtype=term_dtype), -2.0),
    ]
    terms = [
        slots._Term.of([deltas[0]], slots._runs([0, 1, 3])),
        slots._Term.of([deltas[1]], slots._runs([3, 4])),
    ]
    assert terms[0].runs == ((0, 2), (3, 4))
    prompts = 5
    x = torch.randn(2 * prompts, *([tokens] if tokens else []), 6)  # two blocks of five prompts
    expected = layer(x)
    for delta, term in zip(deltas, terms, strict=True):
        for start, stop in term.runs:
            for block in (0, prompts):
                rows = slice(block + start, block + stop)
                added = (x[rows].to(term_dtype) @ delta.a.T @ delta.b.T) * delta.scaling
                expected[rows] += added.to(expected.dtype)
    layer.register_forward_hook(slots._MixedDelta(terms, prompts, None))
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(RuntimeError, match="met a batch of 7"):
        layer(torch.randn(7, 6))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_two_deltas_in_one_term_add_what_they_add_apart(kind) -> None:
    # A merged mixed call's other rows get their own delta and the merged one taken out from one
    # pass over the rows (A stacked): it must add what the two deltas add one by one.
    torch.manual_seed(0)
    if kind == "linear":
        layer, conv, x = torch.nn.Linear(6, 5), None, torch.randn(8, 4, 6)
        shapes = [((r, 6), (5, r)) for r in (2, 3)]
    else:
        layer = torch.nn.Conv2d(6, 5, 3, padding=1)
        conv, x = torch.nn.Conv2d(6, 1, 3, padding=1, bias=False), torch.randn(8, 6, 7, 7)
        shapes = [((r, 6, 3, 3), (5, r, 1, 1)) for r in (2, 3)]
    runs = slots._runs([1, 2])
    deltas = [
        slots._Delta(torch.randn(sa), torch.randn(sb), s)
        for (sa, sb), s in zip(shapes, (0.5, -1.5), strict=True)
    ]
    apart = [slots._Term.of([d], runs) for d in deltas]
    together = slots._Term.of(deltas, runs)
    assert together.a.shape[0] == 5 and len(together.bs) == 2

    with torch.no_grad():
        hook = layer.register_forward_hook(slots._MixedDelta(apart, 4, conv))
        expected = layer(x)
        hook.remove()
        untouched = layer(x)
        layer.register_forward_hook(slots._MixedDelta([together], 4, conv))
        got = layer(x)
    torch.testing.assert_close(got, expected)
    rows = [1, 2, 5, 6]  # two blocks of four prompts
    others = [i for i in range(8) if i not in rows]
    assert torch.equal(got[others], untouched[others])
    assert (got[rows] - untouched[rows]).abs().max() > 0.1


def test_one_slots_deltas_at_two_scales_are_one_delta_at_their_difference() -> None:
    # Rows of the merged adapter at another scale: its own delta less the merged one's.
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    term = slots._Term.of([slots._Delta(a, b, 2.0), slots._Delta(a, b, -0.5)], ((0, 1),))
    assert term.a is a and term.bs == ((b, 1.5),)
    assert slots._Term.of([], ((0, 1),)) is None
