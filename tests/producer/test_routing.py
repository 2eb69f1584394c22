"""Shard routing: every process puts one adapter on one shard queue, and the shards share adapters evenly."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from producer.errors import SettingsError
from producer.routing import adapter_shard, shard_queue


def test_an_adapter_has_the_same_shard_in_every_process() -> None:
    # Python's own hash() changes per process (PYTHONHASHSEED); the shard must not.
    code = "from producer.routing import adapter_shard; print(adapter_shard('styles/watercolor'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert int(other.stdout) == adapter_shard("styles/watercolor") == 9
    assert adapter_shard("lora-0000") == 1162


def test_shards_are_spread_evenly_and_in_range() -> None:
    counts = Counter(adapter_shard(f"adapter-{i}", 16) for i in range(16_000))

    assert set(counts) == set(range(16))
    assert max(counts.values()) < 1.1 * 1000 and min(counts.values()) > 0.9 * 1000


def test_queue_names() -> None:
    assert shard_queue(0) == "omni.a.0"
    assert shard_queue(2047) == "omni.a.2047"


def test_a_shard_count_below_one_is_refused() -> None:
    with pytest.raises(SettingsError, match="shards must be >= 1, got 0"):
        adapter_shard("a", 0)
