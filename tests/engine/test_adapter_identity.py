"""An adapter is its content: any byte that changes the image is noticed, however the files were written."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from fixtures.engine import image_bytes

from omni_engine.lora import adapter as adapter_module
from omni_engine.lora import manager as manager_module
from omni_engine.lora.request import LoRARequest

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
CTIME_TICK_S = 0.05  # above the kernel's coarse clock tick, so a later write gets a later ctime


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _generate(omni, request):
    return omni.generate("x", seed=1, lora_request=request)[0]


def _served(omni_factory, make_adapter):
    """An engine that has served adapter "a" once, and "b": same rank and targets, so a weights file
    of the same size to rewrite "a" with. Returns (omni, a's path, b's path, a's request, a's output)."""
    omni = omni_factory()
    path = make_adapter("a", seed=1)
    other = make_adapter("b", seed=2)
    request = LoRARequest("a", 1, str(path))
    return omni, path, other, request, _generate(omni, request)


def _rewrite_in_place_keeping_times(target: Path, source: Path) -> None:
    """What `cp -p`, `rsync --inplace -t` or tar do: same inode, new bytes, the old atime and mtime."""
    before = target.stat()
    data = source.read_bytes()
    assert len(data) == before.st_size, "the rewrite must keep the size for this test to mean anything"
    with open(target, "r+b") as f:
        f.write(data)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    kept = ("st_ino", "st_size", "st_mtime_ns")
    assert [getattr(after, k) for k in kept] == [getattr(before, k) for k in kept]


# -- identity -------------------------------------------------------------------------------------


def test_a_config_change_alone_is_applied_while_resident(omni_factory, make_adapter):
    omni = omni_factory()
    path = make_adapter("a", rank=4, alpha=4)
    request = LoRARequest("a", 1, str(path))
    old = _generate(omni, request)

    config = json.loads((path / CONFIG).read_text())
    config["lora_alpha"] = 12  # same weights, new scaling
    (path / CONFIG).write_text(json.dumps(config))
    new = _generate(omni, request)

    assert new.metadata["adapter_source"] == "disk"
    assert new.metadata["lora"]["sha256"] == old.metadata["lora"]["sha256"], "the weights did not change"
    assert new.metadata["lora"]["config_sha256"] == _sha256(path / CONFIG)
    assert new.metadata["lora"]["config_sha256"] != old.metadata["lora"]["config_sha256"]
    assert image_bytes(new) != image_bytes(old)
    assert image_bytes(new) == image_bytes(_generate(omni_factory(), request))
    [info] = omni.list_loras()
    assert info.resident and info.config_sha256 == _sha256(path / CONFIG)
    assert _generate(omni, request).metadata["adapter_source"] == "resident"


def test_digests_are_what_sha256sum_prints(omni_factory, make_adapter):
    omni = omni_factory()
    peft_dir = make_adapter("peft")
    diffusers_dir = make_adapter("diffusers", layout="diffusers")
    peft = _generate(omni, LoRARequest("peft", 1, str(peft_dir))).metadata["lora"]
    diffusers = _generate(omni, LoRARequest("diffusers", 2, str(diffusers_dir))).metadata["lora"]
    assert peft["sha256"] == _sha256(peft_dir / WEIGHTS)
    assert peft["config_sha256"] == _sha256(peft_dir / CONFIG)
    # The diffusers layout keeps its config in the weights' header, which `sha256` already covers.
    assert diffusers["sha256"] == _sha256(diffusers_dir / "pytorch_lora_weights.safetensors")
    assert diffusers["config_sha256"] is None
    by_name = {info.name: info for info in omni.list_loras()}
    assert (by_name["peft"].sha256, by_name["peft"].config_sha256) == (peft["sha256"], peft["config_sha256"])


# -- in-place rewrites that keep size and mtime -----------------------------------------------------


def test_an_in_place_rewrite_keeping_size_and_mtime_is_served_fresh(omni_factory, make_adapter):
    omni, path, other, request, old = _served(omni_factory, make_adapter)

    _rewrite_in_place_keeping_times(path / WEIGHTS, other / WEIGHTS)
    new = _generate(omni, request)

    assert new.metadata["adapter_source"] == "disk"
    assert new.metadata["lora"]["sha256"] == _sha256(path / WEIGHTS)
    assert image_bytes(new) != image_bytes(old)
    assert image_bytes(new) == image_bytes(_generate(omni_factory(), request))


def test_the_ctime_alone_reveals_an_in_place_rewrite(omni_factory, make_adapter, monkeypatch):
    # No racy window: only the stat decides, and the ctime is the one field the rewrite changes.
    monkeypatch.setattr(adapter_module, "RACY_WINDOW_NS", 0)
    omni, path, other, request, old = _served(omni_factory, make_adapter)
    time.sleep(CTIME_TICK_S)

    _rewrite_in_place_keeping_times(path / WEIGHTS, other / WEIGHTS)
    new = _generate(omni, request)

    assert new.metadata["adapter_source"] == "disk"
    assert omni.lora_stats()["rehashes"] == 0
    assert image_bytes(new) != image_bytes(old)


def _ctimes(path: Path) -> dict[str, int]:
    return {os.path.realpath(f): f.stat().st_ctime_ns for f in (path / CONFIG, path / WEIGHTS)}


def _same_tick(monkeypatch, held_ctimes: dict[str, int]) -> None:
    """Simulate a coarse ctime clock: the rewrite lands in the tick of the first write, so its ctime
    is the one recorded (a real kernel does this for writes a few milliseconds apart; a test cannot
    time that reliably, so the stat the manager sees is given the recorded ctime)."""
    real = manager_module.signature

    def coarse(path, roots, *, adapter):
        directory, sig = real(path, roots, adapter=adapter)
        return directory, tuple((*stat[:5], held_ctimes.get(stat[0], stat[5])) for stat in sig)

    monkeypatch.setattr(manager_module, "signature", coarse)


def test_a_rewrite_in_the_same_ctime_tick_is_caught_by_rehashing(omni_factory, make_adapter, monkeypatch):
    omni, path, other, request, old = _served(omni_factory, make_adapter)
    _same_tick(monkeypatch, _ctimes(path))

    _rewrite_in_place_keeping_times(path / WEIGHTS, other / WEIGHTS)
    new = _generate(omni, request)

    assert new.metadata["adapter_source"] == "disk"
    assert image_bytes(new) != image_bytes(old)
    assert image_bytes(new) == image_bytes(_generate(omni_factory(), request))


def test_without_the_racy_window_a_same_tick_rewrite_would_be_missed(omni_factory, make_adapter, monkeypatch):
    """The control for the test above: the simulated stat really is indistinguishable."""
    monkeypatch.setattr(adapter_module, "RACY_WINDOW_NS", 0)
    omni, path, other, request, _ = _served(omni_factory, make_adapter)
    _same_tick(monkeypatch, _ctimes(path))
    time.sleep(CTIME_TICK_S)  # mtime is restored, ctime simulated: no time stamp is near the check

    _rewrite_in_place_keeping_times(path / WEIGHTS, other / WEIGHTS)
    assert _generate(omni, request).metadata["adapter_source"] == "resident"


def test_a_racy_adapter_is_rehashed_until_its_files_are_older_than_the_window(
    omni_factory, make_adapter, monkeypatch
):
    window_s = 0.5
    monkeypatch.setattr(adapter_module, "RACY_WINDOW_NS", int(window_s * 1e9))
    omni = omni_factory()
    request = LoRARequest("a", 1, str(make_adapter("a")))
    first = _generate(omni, request)  # read right after the files were written: racy

    assert _generate(omni, request).metadata["adapter_source"] == "resident"
    assert omni.lora_stats()["rehashes"] == 1, "unchanged content is confirmed, not loaded again"
    time.sleep(window_s + 0.1)
    third = _generate(omni, request)  # confirmed once more if the last check was within the window
    rehashes = omni.lora_stats()["rehashes"]
    assert rehashes in (1, 2)
    for _ in range(2):  # now the files are older than the window at the last check: the stat suffices
        assert _generate(omni, request).metadata["adapter_source"] == "resident"
    assert omni.lora_stats()["rehashes"] == rehashes
    assert omni.lora_stats()["disk_loads"] == 1
    assert image_bytes(third) == image_bytes(first)


@pytest.mark.parametrize("field", ["mtime", "ctime"])
def test_racy_means_a_time_stamp_near_the_check(field):
    checked = 100 * 10**9
    window = adapter_module.RACY_WINDOW_NS
    old = checked - 2 * window

    def racy(mtime: int, ctime: int) -> bool:
        stat = ("/a/adapter_model.safetensors", 1, 2, 3, mtime, ctime)
        return adapter_module.LoRAAdapter(
            "a", Path("/a"), "0", None, None, {}, {}, 0, (stat,), checked_ns=checked
        ).racy

    assert not racy(old, old)
    near = {"mtime": (checked - window // 2, old), "ctime": (old, checked - window // 2)}[field]
    assert racy(*near)
    assert racy(old, checked + 1)  # a ctime after the check: a clock that cannot be trusted
    assert not racy(checked + 10 * window, old), "a future mtime alone (tar from a skewed clock) is fine"
