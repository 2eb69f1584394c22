"""Adapters read on a background thread before the call that needs them."""

from __future__ import annotations

import threading

import pytest
import torch
from fixtures.engine import image_bytes

from omni_engine.errors import AdapterNotFoundError
from omni_engine.lora.request import LoRARequest
from omni_engine.lora.synth import write_random_adapter

PROMPT, SEED = "a windmill at dusk", 11


def _settle(omni) -> None:
    omni._lora._prefetcher.join(timeout=60)


def test_a_prefetched_adapter_is_used_without_a_read_on_the_call(omni_factory, make_adapter):
    request = LoRARequest("a", 1, str(make_adapter("a")))
    reference = image_bytes(omni_factory().generate(PROMPT, seed=SEED, lora_request=request)[0])

    omni = omni_factory()
    omni.prefetch_loras([request])
    _settle(omni)
    output = omni.generate(PROMPT, seed=SEED, lora_request=request)[0]

    assert image_bytes(output) == reference
    # Its files were read for this call, ahead of time: still "disk", counted once.
    assert output.metadata["adapter_source"] == "disk"
    stats = omni.lora_stats()
    assert stats["disk_loads"] == 1 and stats["prefetched"] == 1
    assert output.metadata["timings"]["stall_s"] >= 0.0


def test_reads_run_on_one_torch_thread_and_leave_the_callers_threads_alone(
    omni_factory, make_adapter, monkeypatch
):
    """A read with a thread team of its own would take cores from the denoiser mid-step."""
    import omni_engine.lora.manager as manager

    omni = omni_factory()
    seen: list[int] = []
    real_read = manager.read_adapter

    def read_and_note(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_read(*args, **kwargs)

    monkeypatch.setattr(manager, "read_adapter", read_and_note)
    before = torch.get_num_threads()
    omni.prefetch_loras([LoRARequest("a", 1, str(make_adapter("a")))])
    _settle(omni)

    assert seen == [1]
    assert torch.get_num_threads() == before
    later: list[int] = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [before], "a thread that starts using torch later gets the caller's count"


def test_held_adapters_are_not_read_again_and_a_call_without_prefetch_stalls(omni_factory, make_adapter):
    omni = omni_factory()
    request = LoRARequest("a", 1, str(make_adapter("a")))
    first = omni.generate(PROMPT, seed=SEED, lora_request=request)[0]
    assert first.metadata["timings"]["stall_s"] > 0.0, "a cold call reads on the generating thread"
    omni.prefetch_loras([request])  # held as it is on disk: nothing to read
    assert omni._lora._prefetcher.pending() == []
    again = omni.generate(PROMPT, seed=SEED, lora_request=request)[0]
    assert again.metadata["timings"]["stall_s"] == 0.0
    assert omni.lora_stats()["prefetched"] == 0


def test_an_adapter_changed_after_its_prefetch_is_read_again(omni_factory, make_adapter, tiny_transformer):
    path = make_adapter("a", seed=1)
    request = LoRARequest("a", 1, str(path))
    omni = omni_factory()
    omni.prefetch_loras([request])
    _settle(omni)
    write_random_adapter(path, tiny_transformer, rank=8, seed=2)  # new content, same directory
    output = omni.generate(PROMPT, seed=SEED, lora_request=request)[0]

    fresh = omni_factory().generate(PROMPT, seed=SEED, lora_request=request)[0]
    assert image_bytes(output) == image_bytes(fresh)
    assert output.metadata["lora"]["sha256"] == fresh.metadata["lora"]["sha256"]
    assert omni.lora_stats()["prefetched"] == 0


def test_a_bad_prefetch_is_reported_by_the_call_that_needs_it(omni_factory, tmp_path):
    omni = omni_factory()
    missing = LoRARequest("gone", 1, str(tmp_path / "no-such-adapter"))
    omni.prefetch_loras([missing])
    _settle(omni)
    with pytest.raises(AdapterNotFoundError, match="gone"):
        omni.generate(PROMPT, seed=SEED, lora_request=missing)
    assert omni.generate(PROMPT, seed=SEED)[0].images


def test_prefetch_keeps_only_the_most_wanted_reads(omni_factory, make_adapter):
    omni = omni_factory(max_loras=1, max_cpu_loras=2)
    requests = [LoRARequest(f"a{i}", i + 1, str(make_adapter(f"a{i}"))) for i in range(4)]
    omni.prefetch_loras(requests)
    kept = omni._lora._prefetcher.pending()
    assert kept == [r.lora_path for r in requests[:2]]
    _settle(omni)
    for request in requests:
        omni.generate(PROMPT, seed=SEED, lora_request=request)
    assert omni.lora_stats()["prefetched"] == 2 and omni.lora_stats()["disk_loads"] == 4
