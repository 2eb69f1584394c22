"""Every adapter error, each from a real bad adapter on disk; the engine is unchanged after each."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from fixtures.engine import TINY_MODELS, denoiser_for, image_bytes
from fixtures.hostile import Exploit
from safetensors.torch import load_file, save_file

from omni_engine import Omni
from omni_engine.errors import (
    AdapterError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
    InvalidAdapterError,
)
from omni_engine.lora.request import LoRARequest

WEIGHTS = "adapter_model.safetensors"
MAX_BYTES = 64 * 1024  # the engine's cap in these tests; a good adapter here is a few KiB
CONFIG = "adapter_config.json"


def _rewrite(path: Path, change) -> Path:
    tensors = load_file(path / WEIGHTS)
    save_file(change(dict(tensors)), path / WEIGHTS)
    return path


def _set_config(path: Path, **updates) -> Path:
    config = json.loads((path / CONFIG).read_text())
    config.update(updates)
    (path / CONFIG).write_text(json.dumps(config))
    return path


def _build(case: str, make, tmp: Path) -> tuple[str, type[AdapterError], str]:
    """Make the bad adapter for `case`: (its path, the error class, words the message must hold)."""
    good = lambda: make(case)  # noqa: E731
    if case == "missing-dir":
        return str(tmp / "nope"), AdapterNotFoundError, "no such directory"
    if case == "missing-weights":
        path = good()
        (path / WEIGHTS).unlink()
        return str(path), InvalidAdapterError, WEIGHTS
    if case == "missing-config":
        path = good()
        (path / CONFIG).unlink()
        return str(path), InvalidAdapterError, CONFIG
    if case == "config-not-json":
        path = good()
        (path / CONFIG).write_text("{r: 4")
        return str(path), InvalidAdapterError, "not valid JSON"
    if case == "config-dora":
        return str(_set_config(good(), use_dora=True)), InvalidAdapterError, "use_dora"
    if case == "config-unknown-key":
        return str(_set_config(good(), surprise=1)), InvalidAdapterError, "surprise"
    if case == "config-regex-pattern":
        # PEFT would use this key as a regular expression: refused, not compiled.
        return str(_set_config(good(), rank_pattern={"(": 4})), InvalidAdapterError, "rank_pattern"
    if case == "config-rank-disagrees":
        return str(_set_config(good(), r=8)), InvalidAdapterError, "config says 8"
    if case == "corrupt":
        path = good()
        (path / WEIGHTS).write_bytes(os.urandom(4096))
        return str(path), InvalidAdapterError, "not a valid safetensors"
    if case == "truncated":
        path = good()
        data = (path / WEIGHTS).read_bytes()
        (path / WEIGHTS).write_bytes(data[: len(data) // 2])
        return str(path), InvalidAdapterError, "truncated"
    if case == "header-lies":
        path = good()
        data = bytearray((path / WEIGHTS).read_bytes())
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        first = next(k for k in header if k != "__metadata__")
        header[first]["shape"][0] += 1  # the same byte span now "holds" a bigger tensor
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= header_len, "test setup: the edited header must fit the original's length"
        text = text.ljust(header_len)
        (path / WEIGHTS).write_bytes(bytes(data[:8]) + text + bytes(data[8 + header_len :]))
        return str(path), InvalidAdapterError, "spans"
    if case == "oversized":
        path = good()
        with open(path / WEIGHTS, "ab") as f:
            f.write(b"\0" * MAX_BYTES)
        return str(path), InvalidAdapterError, "above the limit"
    if case == "nan":

        def poison(t):
            key = next(iter(t))
            t[key] = t[key].clone()
            t[key][0, 0] = float("nan")
            return t

        return str(_rewrite(good(), poison)), InvalidAdapterError, "NaN"
    if case == "pickle-only":
        path = good()
        (path / WEIGHTS).unlink()
        with open(path / "adapter_model.bin", "wb") as f:
            pickle.dump(Exploit(tmp / "marker"), f)
        return str(path), InvalidAdapterError, "pickle"
    if case == "absent-targets":

        def rename(t):
            return {k.replace("transformer_blocks.0", "no_such_blocks.0"): v for k, v in t.items()}

        return str(_rewrite(good(), rename)), IncompatibleAdapterError, "applies to no layer"
    if case == "shape-mismatch":

        def widen(t):
            key = next(k for k in t if k.endswith("lora_A.weight"))
            t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 3)
            return t

        return str(_rewrite(good(), widen)), IncompatibleAdapterError, "shape mismatch"
    if case == "rank-too-large":
        return str(make(case, rank=16, targets=("to_q",))), IncompatibleAdapterError, "max_lora_rank=8"
    if case == "other-component":
        path = good()

        def text_encoder(t):
            t["text_encoder.layers.0.q_proj.lora_A.weight"] = torch.zeros(4, 32)
            return t

        return str(_rewrite(path, text_encoder)), IncompatibleAdapterError, "text_encoder"
    raise AssertionError(case)


CASES = [
    "missing-dir",
    "missing-weights",
    "missing-config",
    "config-not-json",
    "config-dora",
    "config-unknown-key",
    "config-rank-disagrees",
    "config-regex-pattern",
    "corrupt",
    "truncated",
    "header-lies",
    "oversized",
    "nan",
    "pickle-only",
    "absent-targets",
    "shape-mismatch",
    "rank-too-large",
    "other-component",
]


# Every case on every model family.
pytestmark = pytest.mark.parametrize("tiny_model", TINY_MODELS, scope="module")


@pytest.fixture(scope="module")
def warm_engine(tmp_path_factory, tiny_model, denoisers):
    """One engine holding a good adapter; every failure below must leave it exactly as it is."""
    from omni_engine.lora.synth import write_random_adapter

    component, denoiser = denoiser_for(tiny_model, denoisers)
    good = write_random_adapter(
        tmp_path_factory.mktemp("good") / "good", denoiser, seed=5, component=component
    )
    omni = Omni(tiny_model, device="cpu", max_lora_rank=8, max_adapter_bytes=MAX_BYTES)
    request = LoRARequest("good", 1, str(good))
    expected = {
        "base": image_bytes(omni.generate("a cup", seed=4)[0]),
        "good": image_bytes(omni.generate("a cup", seed=4, lora_request=request)[0]),
    }
    return omni, request, expected


@pytest.mark.parametrize("case", CASES)
def test_bad_adapter_raises_a_clear_error_and_changes_nothing(case, warm_engine, make_adapter, tmp_path):
    omni, good, expected = warm_engine
    path, error, words = _build(case, make_adapter, tmp_path)
    held_before = omni.list_loras()
    # stall_s is a duration (the failed call's read adds to it), not state.
    unchanged = lambda stats: {k: v for k, v in stats.items() if k not in ("load_failures", "stall_s")}  # noqa: E731
    stats_before = unchanged(omni.lora_stats())

    with pytest.raises(error) as caught:
        omni.generate("a cup", seed=4, lora_request=LoRARequest(f"bad-{case}", 9, path))

    message = str(caught.value)
    assert f"bad-{case}" in message and words in message, message
    assert isinstance(caught.value, ValueError)
    assert omni.list_loras() == held_before
    assert unchanged(omni.lora_stats()) == stats_before
    assert image_bytes(omni.generate("a cup", seed=4, lora_request=good)[0]) == expected["good"]
    assert image_bytes(omni.generate("a cup", seed=4)[0]) == expected["base"]
    if case == "pickle-only":
        assert not (tmp_path / "marker").exists(), "the pickle was deserialised"
