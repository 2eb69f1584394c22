"""The adapter tiers: LRU order, counters, pinning, identity by content, no copies on a switch."""

from __future__ import annotations

import shutil

import pytest
import torch
from fixtures.engine import TINY_MODELS, image_bytes

from omni_engine.errors import AdapterNotFoundError, LoRACapacityError
from omni_engine.lora.lru import LRUCache
from omni_engine.lora.request import LoRARequest


def test_lru_cache_evicts_least_recent_unpinned_and_tells_its_owner():
    evicted = []
    cache = LRUCache(2, on_evict=lambda k, v: evicted.append((k, v)))
    cache.put("a", 1)
    cache.put("b", 2)
    cache.touch("a")
    cache.put("c", 3)
    assert evicted == [("b", 2)] and list(cache) == ["a", "c"]
    cache.pin("a")
    cache.put("d", 4)
    assert evicted[-1] == ("c", 3) and list(cache) == ["a", "d"]
    cache.pin("d")
    with pytest.raises(LoRACapacityError):
        cache.put("e", 5)
    assert list(cache) == ["a", "d"], "a refused put changes nothing"
    assert cache.remove("a") == 1 and not cache.is_pinned("a")


@pytest.mark.parametrize("tiny_model", TINY_MODELS)
def test_scripted_sequence_counts_every_tier(omni_factory, make_adapter):
    omni = omni_factory(max_loras=2, max_cpu_loras=3)
    paths = {name: str(make_adapter(name)) for name in "abcd"}
    ids = {name: i for i, name in enumerate("abcd", start=1)}

    def run(name):
        request = LoRARequest(name, ids[name], paths[name])
        return omni.generate("x", seed=1, lora_request=request)[0].metadata["adapter_source"]

    sources = [run(name) for name in "abacbda"]
    assert sources == ["disk", "disk", "resident", "disk", "host", "disk", "disk"]
    stats = omni.lora_stats()
    assert stats["disk_loads"] == 5 and stats["cpu_hits"] == 1 and stats["gpu_hits"] == 1
    assert stats["resident_evictions"] == 4 and stats["host_evictions"] == 2 and stats["evictions"] == 6
    assert stats["activations"] == 7
    held = {info.name: info for info in omni.list_loras()}
    assert list(held) == ["a", "d", "b"], "most recently used first"
    assert held["a"].resident and held["d"].resident and not held["b"].resident


def test_pinned_adapter_is_never_evicted_and_a_full_pin_refuses_cleanly(omni_factory, make_adapter):
    pinned_path = str(make_adapter("pinned"))
    omni = omni_factory(lora_path=pinned_path, max_loras=2, max_cpu_loras=2)
    a = LoRARequest("a", 2, str(make_adapter("a")))
    b = LoRARequest("b", 3, str(make_adapter("b")))
    c = LoRARequest("c", 4, str(make_adapter("c")))
    for request in (a, b, a, b):
        omni.generate("x", seed=1, lora_request=request)
    pinned = LoRARequest("pinned", 1, pinned_path)
    assert omni.generate("x", seed=1, lora_request=pinned)[0].metadata["adapter_source"] == "resident"
    assert omni.lora_stats()["disk_loads"] == 5  # pinned once, then a, b, a, b: each evicted the other

    assert omni.pin_lora(3)  # b
    image_b = image_bytes(omni.generate("x", seed=1, lora_request=b)[0])
    before = [(i.name, i.resident, i.pinned) for i in omni.list_loras()]
    with pytest.raises(LoRACapacityError, match="pinned"):
        omni.generate("x", seed=1, lora_request=c)
    assert [(i.name, i.resident, i.pinned) for i in omni.list_loras()] == before
    assert image_bytes(omni.generate("x", seed=1, lora_request=b)[0]) == image_b
    assert omni.remove_lora(3) and not omni.pin_lora(3)
    assert omni.generate("x", seed=1, lora_request=c)[0].metadata["adapter_source"] == "disk"


def test_the_preloaded_adapter_cannot_be_removed_by_an_id_that_names_it(omni_factory, make_adapter):
    path = str(make_adapter("preloaded"))
    omni = omni_factory(lora_path=path)
    request = LoRARequest("same-dir", 7, path)
    assert omni.generate("x", seed=1, lora_request=request)[0].metadata["adapter_source"] == "resident"

    with pytest.raises(ValueError, match="lora_int_id 7 names the engine's pre-loaded adapter"):
        omni.remove_lora(7)
    [info] = omni.list_loras()
    assert info.pinned and info.resident and info.lora_int_ids == (7,)
    assert omni.generate("x", seed=1, lora_request=request)[0].metadata["adapter_source"] == "resident"


def test_identity_is_content_not_id(omni_factory, make_adapter):
    omni = omni_factory()
    path = str(make_adapter("a"))
    omni.generate("x", seed=1, lora_request=LoRARequest("first", 1, path))
    omni.generate("x", seed=1, lora_request=LoRARequest("other-name", 7, path + "/."))
    assert omni.lora_stats()["disk_loads"] == 1
    [info] = omni.list_loras()
    assert info.lora_int_ids == (1, 7)


def test_changed_adapter_content_is_reloaded_never_stale(omni_factory, make_adapter, tmp_path):
    omni = omni_factory()
    path = make_adapter("a", seed=1)
    request = LoRARequest("a", 1, str(path))
    first = omni.generate("x", seed=1, lora_request=request)[0]
    make_adapter("a", seed=2)  # rewrite the same directory with other weights
    second = omni.generate("x", seed=1, lora_request=request)[0]
    assert second.metadata["adapter_source"] == "disk"
    assert second.metadata["lora"]["sha256"] != first.metadata["lora"]["sha256"]
    assert image_bytes(second) != image_bytes(first)
    assert len(omni.list_loras()) == 1, "the old content is dropped, not kept beside the new"
    fresh = omni_factory().generate("x", seed=1, lora_request=request)[0]
    assert image_bytes(fresh) == image_bytes(second)


def test_rewriting_a_resident_adapter_evicts_nothing_else(omni_factory, make_adapter):
    omni = omni_factory(max_loras=2, max_cpu_loras=2)
    a = LoRARequest("a", 1, str(make_adapter("a", seed=1)))
    b = LoRARequest("b", 2, str(make_adapter("b", seed=2)))
    omni.generate("x", seed=1, lora_request=a)
    omni.generate("x", seed=1, lora_request=b)
    make_adapter("b", seed=3)  # new content in b's directory
    assert omni.generate("x", seed=1, lora_request=b)[0].metadata["adapter_source"] == "disk"
    assert omni.lora_stats()["evictions"] == 0
    assert sorted((i.name, i.resident) for i in omni.list_loras()) == [("a", True), ("b", True)]
    assert omni.generate("x", seed=1, lora_request=a)[0].metadata["adapter_source"] == "resident"


def test_a_pinned_preloaded_adapter_can_be_refreshed_in_a_full_cache(omni_factory, make_adapter):
    path = make_adapter("p", seed=1)
    omni = omni_factory(lora_path=str(path), max_loras=1, max_cpu_loras=1)
    request = LoRARequest("p", 1, str(path))
    before = omni.generate("x", seed=1, lora_request=request)[0]
    make_adapter("p", seed=2)
    after = omni.generate("x", seed=1, lora_request=request)[0]
    assert after.metadata["adapter_source"] == "disk"
    assert image_bytes(after) != image_bytes(before)
    [info] = omni.list_loras()
    assert info.pinned and info.resident and info.sha256 == after.metadata["lora"]["sha256"]


def test_a_removed_adapter_fails_clearly_and_is_never_served_stale(omni_factory, make_adapter):
    omni = omni_factory()
    path = make_adapter("gone")
    request = LoRARequest("gone", 1, str(path))
    omni.generate("x", seed=1, lora_request=request)
    shutil.rmtree(path)
    with pytest.raises(AdapterNotFoundError, match="gone"):
        omni.generate("x", seed=1, lora_request=request)


def test_add_lora_holds_it_in_host_memory(omni_factory, make_adapter):
    omni = omni_factory()
    request = LoRARequest("a", 1, str(make_adapter("a")))
    assert omni.add_lora(request)
    [info] = omni.list_loras()
    assert not info.resident
    assert omni.generate("x", seed=1, lora_request=request)[0].metadata["adapter_source"] == "host"
    assert omni.lora_stats()["disk_loads"] == 1 and omni.lora_stats()["cpu_hits"] == 1
    assert omni.add_lora(request)  # already resident: holding it again is no hit of any tier
    assert omni.lora_stats()["gpu_hits"] == 0


def test_switching_and_scaling_copy_no_weights(omni_factory, make_adapter):
    omni = omni_factory(max_loras=2)
    a = LoRARequest("a", 1, str(make_adapter("a")))
    b = LoRARequest("b", 2, str(make_adapter("b")))
    omni.generate("x", seed=1, lora_request=a)
    omni.generate("x", seed=1, lora_request=b)

    def lora_params():
        return {
            name: (p.data_ptr(), p.detach().clone())
            for name, p in omni.pipeline.transformer.named_parameters()
            if "lora_" in name
        }

    before = lora_params()
    for request, scale in ((a, 1.0), (b, 0.5), (a, 2.0), (b, 1.0), (a, 0.0)):
        omni.generate("x", seed=1, lora_request=request, lora_scale=scale)
    after = lora_params()
    assert before.keys() == after.keys() and before
    for name, (ptr, value) in before.items():
        assert after[name][0] == ptr and torch.equal(after[name][1], value), name
    assert omni.lora_stats()["disk_loads"] == 2 and omni.lora_stats()["gpu_hits"] == 5


@pytest.mark.parametrize(("max_loras", "max_cpu_loras"), [(0, 4), (4, 2)])
def test_cache_sizes_are_checked(omni_factory, max_loras, max_cpu_loras):
    with pytest.raises(ValueError, match="max_"):
        omni_factory(max_loras=max_loras, max_cpu_loras=max_cpu_loras)
