"""A failed injection: rolled back either way; only the adapter's own faults become AdapterError,
and a refused adapter is reported in one log line of the engine's, none of diffusers'."""

from __future__ import annotations

import logging

import peft
import pytest
import torch
from fixtures.engine import image_bytes

from omni_engine.errors import AdapterError, IncompatibleAdapterError
from omni_engine.lora.request import LoRARequest
from omni_engine.lora.synth import DEFAULT_TARGETS

ENGINE_LOGGER = "omni.engine"
# Adapters that target a layer no resident one does: loading one builds LoRA layers, which is where
# diffusers and PEFT run (an adapter over covered layers is only copied into a slot).
WIDER = (*DEFAULT_TARGETS, "proj_out")


@pytest.fixture
def warm(omni_factory, make_adapter):
    """An engine holding one resident adapter and one held in host memory only, with their images."""
    omni = omni_factory(max_loras=2)
    good = LoRARequest("good", 1, str(make_adapter("good", seed=1)))
    held = LoRARequest("held", 2, str(make_adapter("held", seed=2, targets=WIDER)))
    omni.add_lora(held)
    images = {
        "base": image_bytes(omni.generate("a cup", seed=4)[0]),
        "good": image_bytes(omni.generate("a cup", seed=4, lora_request=good)[0]),
    }
    return omni, good, held, images


def _state(omni):
    """What a failed load must not change. stall_s is a duration (the failed call's read adds to
    it), not state."""
    stats = omni.lora_stats()
    del stats["stall_s"]
    return omni.list_loras(), stats


def _assert_unchanged(omni, good, images, before) -> None:
    assert _state(omni) == before
    assert image_bytes(omni.generate("a cup", seed=4, lora_request=good)[0]) == images["good"]
    assert image_bytes(omni.generate("a cup", seed=4)[0]) == images["base"]


def _fail_in_peft(monkeypatch, stage: str, error: BaseException) -> None:
    """Make diffusers' load_lora_adapter fail inside its own try block, at `stage`.

    "layers": while PEFT allocates the second wrapper layer's weights (the first is already in
    place); "weights": after every layer is wrapped, while the weights are copied in; "before":
    before PEFT has registered anything (diffusers imports these functions from peft at call time).
    """
    if stage == "layers":
        from peft.tuners.lora.layer import LoraLayer

        real_update = LoraLayer.update_layer
        calls = []

        def update_layer(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise error
            return real_update(self, *args, **kwargs)

        monkeypatch.setattr(LoraLayer, "update_layer", update_layer)
        return
    name = {"before": "inject_adapter_in_model", "weights": "set_peft_model_state_dict"}[stage]
    real = getattr(peft, name)

    def fail(*args, **kwargs):
        if stage == "weights":
            real(*args, **kwargs)
        raise error

    monkeypatch.setattr(peft, name, fail)


def _diffusers_records(caplog):
    """diffusers' loggers do not propagate to the root logger that caplog watches: listen on theirs."""
    logger = logging.getLogger("diffusers")
    logger.addHandler(caplog.handler)
    return logger


# Simulated: this machine has no GPU, so CUDA's out-of-memory error is raised by a stand-in for the
# PEFT call that allocates the adapter's weights; everything around it (diffusers, PEFT, the
# engine's rollback) runs for real.
OUT_OF_MEMORY = {
    "cuda-oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"),
    "host-oom": lambda: MemoryError(),
    "device-error": lambda: RuntimeError("CUDA error: an illegal memory access was encountered (simulated)"),
}


@pytest.mark.parametrize(
    ("kind", "stage", "which"),
    [
        *((kind, stage, "new") for kind in sorted(OUT_OF_MEMORY) for stage in ("layers", "weights")),
        ("cuda-oom", "layers", "held"),  # held in host memory, failing on its way into the model
    ],
)
def test_out_of_memory_propagates_unchanged_and_changes_nothing(
    warm, make_adapter, monkeypatch, caplog, stage, kind, which
):
    omni, good, held, images = warm
    new = LoRARequest("new", 3, str(make_adapter("new", seed=3, targets=WIDER)))
    request = held if which == "held" else new
    before = _state(omni)
    error = OUT_OF_MEMORY[kind]()
    _fail_in_peft(monkeypatch, stage, error)
    diffusers_logger = _diffusers_records(caplog)

    try:
        with pytest.raises(type(error)) as caught:
            omni.generate("a cup", seed=4, lora_request=request)
    finally:
        diffusers_logger.removeHandler(caplog.handler)

    assert caught.value is error and not isinstance(caught.value, AdapterError)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == [], "raised, not logged"
    monkeypatch.undo()
    _assert_unchanged(omni, good, images, before)
    # Nothing is wedged: the same adapter loads once memory allows.
    output = omni.generate("a cup", seed=4, lora_request=request)[0]
    assert output.metadata["lora"]["name"] == request.lora_name


def test_an_error_raised_from_out_of_memory_propagates_the_out_of_memory(warm, make_adapter, monkeypatch):
    omni, good, _, images = warm
    before = _state(omni)
    new = LoRARequest("new", 3, str(make_adapter("new", targets=WIDER)))  # before PEFT is made to fail
    oom = torch.OutOfMemoryError("CUDA out of memory (simulated)")
    wrapped = ValueError("could not load the weights")
    wrapped.__cause__ = oom
    _fail_in_peft(monkeypatch, "weights", wrapped)

    with pytest.raises(torch.OutOfMemoryError) as caught:
        omni.generate("a cup", seed=4, lora_request=new)
    assert caught.value is oom
    monkeypatch.undo()
    _assert_unchanged(omni, good, images, before)


def test_an_error_diffusers_hides_behind_its_own_cleanup_error_is_not_an_adapter_fault(
    warm, make_adapter, monkeypatch
):
    """Failing before PEFT registers the adapter makes diffusers' cleanup raise KeyError (its
    peft_config.pop), with the real error as context: the real one still decides."""
    omni, good, _, images = warm
    before = _state(omni)
    new = LoRARequest("new", 3, str(make_adapter("new", targets=WIDER)))  # before PEFT is made to fail
    oom = torch.OutOfMemoryError("CUDA out of memory (simulated)")
    _fail_in_peft(monkeypatch, "before", oom)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        omni.generate("a cup", seed=4, lora_request=new)
    assert caught.value is oom

    device = RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
    _fail_in_peft(monkeypatch, "before", device)
    with pytest.raises(RuntimeError) as caught:
        omni.generate("a cup", seed=4, lora_request=new)
    assert caught.value is device
    monkeypatch.undo()
    _assert_unchanged(omni, good, images, before)


@pytest.mark.parametrize("stage", ["before", "layers", "weights"])
def test_a_refused_injection_logs_one_warning_and_no_diffusers_error(
    warm, make_adapter, monkeypatch, caplog, stage
):
    # Every adapter fault we can write to disk is refused before injection (see
    # test_adapter_errors.py), so PEFT's own refusal of one is simulated, as the ValueError it raises.
    omni, _, _, _ = warm
    before = _state(omni)
    new = LoRARequest("new", 3, str(make_adapter("new", targets=WIDER)))  # before PEFT is made to fail
    _fail_in_peft(monkeypatch, stage, ValueError("Target module Foo is not supported (simulated)"))
    diffusers_logger = _diffusers_records(caplog)
    caplog.set_level(logging.DEBUG)

    try:
        with pytest.raises(IncompatibleAdapterError, match=r"new.*not supported"):
            omni.generate("a cup", seed=4, lora_request=new)
    finally:
        diffusers_logger.removeHandler(caplog.handler)

    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.levelname) for r in loud] == [(ENGINE_LOGGER, "WARNING")], loud
    assert "'new'" in loud[0].getMessage() and "not supported" in loud[0].getMessage()
    monkeypatch.undo()
    after_lists, after_stats = _state(omni)
    assert after_lists == before[0]
    assert after_stats == {**before[1], "load_failures": before[1]["load_failures"] + 1}


def test_an_adapter_refused_before_injection_logs_one_warning(omni_factory, make_adapter, caplog):
    bad = make_adapter("bad", rank=16)  # above max_lora_rank
    omni = omni_factory(max_lora_rank=8)
    caplog.set_level(logging.DEBUG)
    diffusers_logger = _diffusers_records(caplog)
    try:
        with pytest.raises(IncompatibleAdapterError, match="max_lora_rank"):
            omni.generate("a cup", seed=4, lora_request=LoRARequest("bad", 1, str(bad)))
    finally:
        diffusers_logger.removeHandler(caplog.handler)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.name, r.levelname) for r in loud] == [(ENGINE_LOGGER, "WARNING")], loud
    message = loud[0].getMessage()
    assert "'bad'" in message and "IncompatibleAdapterError" in message and "max_lora_rank=8" in message
